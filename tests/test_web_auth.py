"""Dashboard sign-in, sessions, CSRF, and that nothing is served without a session.

Real server processes on loopback; the browser is Debian's Chromium under Playwright,
and plain HTTP checks use httpx with the cookie the browser was given.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import httpx
import httpx_sse
from playwright.sync_api import expect

from conftest import Kitt
from dashboard import Dashboard
from kitt.server.app import create_app

STATIC = Path(__file__).parent.parent / "src" / "kitt" / "server" / "web" / "static"

# Served without a session, on purpose: the login form, liveness, the spec, the fleet
# CA and the agent installer (public by nature: ARCHITECTURE.md §6, docs/install.md),
# and the dashboard's own static files (code and styles, no data).
PUBLIC = {
    "web.login",
    "web.login_submit",
    "web.logout",  # without a session it only clears the cookie and goes to /login
    "web.index",  # a redirect to /fleet, which then asks for a login
    "web.static",
    "health",
    "openapi_document",
    "ca_pem",
}
PUBLIC_PREFIXES = ("agent_package.",)
# Agents' own endpoints: they refuse anything without an agent credential (tested in
# depth by test_security.py); here only that a user without one gets nothing.
AGENT_PREFIX = "agent_channel."


def session_cookie(board: Dashboard) -> str:
    return str(board.cookies()["kitt_session"]["value"])


def csrf_of(board: Dashboard) -> str:
    return str(board.page.locator('meta[name="csrf-token"]').get_attribute("content"))


def test_sign_in_out_and_session_cookie(kitt: Kitt, dashboard: Dashboard) -> None:
    kitt.start_server()
    page = dashboard.page

    # A page asked for without a session goes to the login form, remembering where to.
    dashboard.goto("/results?model=x")
    expect(page).to_have_url(re.compile(r"/login\?next=/results(\?|%3F)model%3Dx$"))

    page.get_by_label("Admin token").fill("kitt_adm_not-the-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_contain_text("Admin token not accepted")
    assert "kitt_session" not in dashboard.cookies()
    dashboard.shot("login-refused", full_page=False)

    page.get_by_label("Admin token").fill(kitt.admin_token)
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(re.compile(r"/results\?model=x$"))  # back where the user was
    cookie = dashboard.cookies()["kitt_session"]
    assert cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict"
    assert cookie["secure"] is False  # plain HTTP: a Secure cookie would never come back
    assert cookie["value"].startswith("kitt_ses_")
    assert kitt.admin_token not in cookie["value"]
    # The page's scripts cannot read it (HttpOnly), and the session works for the API.
    assert page.evaluate("document.cookie").find("kitt_session") == -1
    listed = page.evaluate("kitt.api('GET', '/api/v1/agents')")
    assert listed == {"agents": []}

    secret = cookie["value"]
    dashboard.logout()
    assert "kitt_session" not in dashboard.cookies()
    dashboard.goto("/fleet")
    expect(page).to_have_url(re.compile(r"/login"))
    # Logging out ended the session on the server: the old cookie opens nothing now.
    replay = httpx.get(kitt.server_url + "/api/v1/agents", cookies={"kitt_session": secret})
    assert replay.status_code == 401
    replay = httpx.get(kitt.server_url + "/fleet", cookies={"kitt_session": secret})
    assert replay.status_code == 302 and "/login" in replay.headers["location"]


def test_csrf_is_required_for_every_change(kitt: Kitt, dashboard: Dashboard) -> None:
    kitt.start_server()
    dashboard.login()
    cookies = {"kitt_session": session_cookie(dashboard)}
    token = csrf_of(dashboard)
    url = kitt.server_url
    body = {"agent": "nobody", "benchmark": "serving", "model": "m"}

    # A forged request carries the cookie (a browser would send it) but not the token.
    forged = httpx.post(url + "/api/v1/tests", json=body, cookies=cookies)
    assert forged.status_code == 403 and "CSRF" in forged.json()["error"]
    wrong = httpx.post(url + "/api/v1/tests", json=body, cookies=cookies,
                       headers={"X-CSRF-Token": "x" * 43})  # fmt: skip
    assert wrong.status_code == 403
    cross = httpx.post(url + "/api/v1/tests", json=body, cookies=cookies,
                       headers={"X-CSRF-Token": token, "Origin": "https://evil.example"})  # fmt: skip
    assert cross.status_code == 403 and "cross-site" in cross.json()["error"]
    # With the page's token it reaches the endpoint (which then judges the request).
    real = httpx.post(url + "/api/v1/tests", json=body, cookies=cookies,
                      headers={"X-CSRF-Token": token})  # fmt: skip
    assert real.status_code == 404 and "no agent" in real.json()["error"]
    # Reading needs no token: GET changes nothing.
    assert httpx.get(url + "/api/v1/tests", cookies=cookies).status_code == 200
    assert kitt.api("GET", "/api/v1/tests").json()["tests"] == []

    # Logging out is a change too: without the token the session survives.
    assert httpx.post(url + "/logout", cookies=cookies).status_code == 403
    assert httpx.get(url + "/api/v1/tests", cookies=cookies).status_code == 200
    out = httpx.post(url + "/logout", cookies=cookies, data={"csrf_token": token})
    assert out.status_code == 303
    assert httpx.get(url + "/api/v1/tests", cookies=cookies).status_code == 401

    # The login form has its own token (double submit): a form posted from elsewhere,
    # without the cookie the login page set, signs no one in.
    blind = httpx.post(url + "/login", data={"token": kitt.admin_token, "csrf_token": "x"})
    assert blind.status_code == 403 and "kitt_session" not in blind.cookies
    assert "form expired" in blind.text


def test_https_cookie_is_secure_and_host_only(kitt: Kitt, dashboard: Dashboard) -> None:
    kitt.run("server", "start", "--port", str(kitt.server_port), "--tls", check=True)
    dashboard.https = True
    dashboard.login()
    cookie = dashboard.cookies()["__Host-kitt_session"]
    assert cookie["secure"] is True and cookie["httpOnly"] is True
    assert cookie["sameSite"] == "Strict" and cookie["path"] == "/"
    headers = dashboard.page.goto(dashboard.url("/fleet")).headers
    assert "script-src 'self'" in headers["content-security-policy"]
    assert headers["x-frame-options"] == "DENY"
    assert headers["cache-control"] == "no-store"


def test_new_admin_token_ends_old_sessions(kitt: Kitt, dashboard: Dashboard) -> None:
    kitt.start_server()
    dashboard.login()
    secret = session_cookie(dashboard)
    assert httpx.get(kitt.server_url + "/api/v1/agents",
                     cookies={"kitt_session": secret}).status_code == 200  # fmt: skip
    kitt.run("server", "stop", check=True)
    (kitt.home / "server" / "admin-token").unlink()  # the operator rotates the token
    kitt.start_server()
    dashboard.goto("/fleet")
    expect(dashboard.page).to_have_url(re.compile(r"/login"))
    assert httpx.get(kitt.server_url + "/api/v1/agents",
                     cookies={"kitt_session": secret}).status_code == 401  # fmt: skip


def _login_field(text: str) -> str:
    field = re.search(r'name="csrf_token" value="([^"]+)"', text)
    assert field is not None, text
    return field[1]


def test_failed_logins_are_throttled(kitt: Kitt) -> None:
    kitt.start_server()
    with httpx.Client(base_url=kitt.server_url) as client:
        form = client.get("/login")
        codes = []
        for i in range(11):
            # Each answer is a fresh form with a fresh login token, as a browser sees it.
            form = client.post("/login", data={"token": f"kitt_adm_{i}",
                                               "csrf_token": _login_field(form.text)})  # fmt: skip
            codes.append(form.status_code)
        assert codes[:10] == [401] * 10
        assert codes[10] == 429
        # Even the right token waits out the window: the guesser cannot tell.
        late = client.post("/login", data={"token": kitt.admin_token,
                                           "csrf_token": _login_field(form.text)})  # fmt: skip
        assert late.status_code == 429 and int(late.headers["retry-after"]) > 0


def _routes() -> list[tuple[str, str, str]]:
    """Every (method, path, endpoint) the server answers, read off the app itself, so a
    page or endpoint added later is checked without anyone remembering to list it."""
    settings = SimpleNamespace(numthreads=4)
    app = create_app(settings, None, None, SimpleNamespace(sessions=None), None, None, None,
                     None)  # type: ignore[arg-type]  # fmt: skip
    found = []
    for rule in app.url_map.iter_rules():
        # A placeholder each converter accepts: "x", or an any(...) rule's first choice.
        path = re.sub(r"<any\(([^,)]+)[^>]*>", lambda m: m[1].strip(" '\""), rule.rule)
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", "x", path)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            found.append((method, path, rule.endpoint))
    return sorted(found)


def test_nothing_is_served_without_a_session(kitt: Kitt) -> None:
    kitt.start_server()
    routes = _routes()
    user_facing = [r for r in routes if r[2] not in PUBLIC and not r[2].startswith(PUBLIC_PREFIXES)
                   and not r[2].startswith(AGENT_PREFIX)]  # fmt: skip
    # The dashboard's pages and data endpoints are all among them.
    endpoints = {r[2] for r in user_facing}
    assert {"fleet_pages.fleet", "test_pages.test", "results_pages.results"} <= endpoints
    assert {"fleet.list_agents", "tests.logs", "results.show"} <= endpoints
    refused: dict[str, int] = {}
    with httpx.Client(base_url=kitt.server_url, timeout=10) as client:
        for method, path, _endpoint in user_facing:
            # A stale or forged cookie is no better than none.
            for forged in (None, "kitt_ses_forged"):
                client.cookies.clear()
                if forged:
                    client.cookies.set("kitt_session", forged)
                answer = client.request(method, path)
                if path.startswith("/api/") or path == "/metrics":  # machine endpoints
                    assert answer.status_code == 401, (method, path, answer.text)
                elif method == "GET":
                    assert answer.status_code == 302, (method, path, answer.text)
                    assert answer.headers["location"].startswith("/login?next=")
                else:
                    assert answer.status_code == 401, (method, path, answer.text)
                refused[f"{method} {path}"] = answer.status_code
        for method, path, _ in routes:
            if _ in PUBLIC or not _.startswith(AGENT_PREFIX):
                continue
            answer = client.request(method, path)
            assert answer.status_code in (400, 401, 403), (method, path, answer.text)
    assert len(refused) == len(user_facing) >= 24
    # And the refusals changed nothing.
    assert kitt.api("GET", "/api/v1/tests").json()["tests"] == []
    assert kitt.api("GET", "/api/v1/tokens").json()["tokens"] == []


def test_login_page_and_assets_are_self_contained(kitt: Kitt) -> None:
    """No CDN: every script and style the pages use comes from this server, and the
    vendored files are byte for byte the npm releases recorded in VENDORED.md."""
    kitt.start_server()
    page = httpx.get(kitt.server_url + "/login")
    assert page.status_code == 200
    assert "script-src 'self'" in page.headers["content-security-policy"]
    templates = (STATIC.parent / "templates").glob("*.html")
    for template in templates:
        text = template.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), template.name
        assert "<script>" not in text and " on" + "click=" not in text, template.name
    recorded = (STATIC / "vendor" / "VENDORED.md").read_text()
    sums = dict(
        (name, digest) for digest, name in re.findall(r"^([0-9a-f]{64})  (\S+)$", recorded, re.M)
    )
    assert len(sums) == 3
    for name, digest in sums.items():
        data = (STATIC / "vendor" / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, name
        served = httpx.get(f"{kitt.server_url}/static/vendor/{name}")
        assert served.status_code == 200 and served.content == data


def test_no_auth_server_refuses_other_sites_and_other_names(kitt: Kitt) -> None:
    """Without sign-in, a page of another site could still post to the local server
    (a "simple" request needs no CORS permission) or reach it under a rebound name."""
    kitt.start_server("--no-auth")
    url = kitt.server_url
    body = {"ttl_s": 3600, "uses": 1}
    forged = httpx.post(
        url + "/api/v1/tokens", json=body, headers={"Origin": "https://evil.example"}
    )
    assert forged.status_code == 403 and "cross-site" in forged.json()["error"]
    simple = httpx.post(url + "/api/v1/tokens", content=json.dumps(body),
                        headers={"Content-Type": "text/plain", "Sec-Fetch-Site": "cross-site"})  # fmt: skip
    assert simple.status_code == 403 and "CSRF" in simple.json()["error"]
    rebound = httpx.get(url + "/api/v1/agents", headers={"Host": "evil.example"})
    assert rebound.status_code == 403 and "loopback names" in rebound.json()["error"]
    page = httpx.get(url + "/fleet", headers={"Host": f"evil.example:{kitt.server_port}"})
    assert page.status_code == 403 and "csrf-token" not in page.text
    assert kitt.api("GET", "/api/v1/tokens").json()["tokens"] == []
    # The CLI (no browser headers, a loopback name) is served as before.
    made = httpx.post(f"http://localhost:{kitt.server_port}/api/v1/tokens", json=body)
    assert made.status_code == 201


def test_signing_out_ends_open_live_streams(kitt: Kitt) -> None:
    kitt.start_server()
    with httpx.Client(base_url=kitt.server_url, timeout=httpx.Timeout(10, read=60)) as client:
        form = client.get("/login")
        done = client.post("/login", data={"token": kitt.admin_token,
                                           "csrf_token": _login_field(form.text)})  # fmt: skip
        assert done.status_code == 303
        page = client.get("/fleet")
        csrf = re.search(r'name="csrf-token" content="([^"]+)"', page.text)
        assert csrf is not None
        with httpx_sse.connect_sse(client, "GET", "/api/v1/fleet/events") as source:
            events = (e for e in source.iter_sse() if e.data)  # not the retry hint
            first = next(events)
            assert first.event == "snapshot" and json.loads(first.data) == {"agents": []}
            with httpx.Client(base_url=kitt.server_url) as other:
                other.cookies.set("kitt_session", client.cookies["kitt_session"])
                out = other.post("/logout", data={"csrf_token": csrf[1]})
                assert out.status_code == 303
            started = time.monotonic()
            rest = [e.event for e in events]  # ends when the server closes the stream
            waited = time.monotonic() - started
        assert "agent" not in rest and waited < 45, (rest, waited)


def test_no_auth_server_pages_need_no_login_but_changes_need_the_token(
    kitt: Kitt, dashboard: Dashboard
) -> None:
    kitt.start_server("--no-auth")
    dashboard.goto("/fleet")
    expect(dashboard.page).to_have_url(re.compile(r"/fleet$"))
    expect(dashboard.page.get_by_role("button", name="Sign out")).to_have_count(0)
    token = csrf_of(dashboard)
    # A page of another site cannot read the token, so it cannot post a page's form.
    forged = httpx.post(kitt.server_url + "/tests/new", data={"model": "m"})
    assert forged.status_code == 403 and "CSRF" in forged.text
    assert kitt.api("GET", "/api/v1/tests").json()["tests"] == []
    assert len(token) >= 40


OFF_SITE = ["//evil.example/x", "https://evil.example", "/\\evil", "/\t/evil.example",
            "/\n/evil.example", " //evil.example", "/\x00/x"]  # fmt: skip


def test_login_never_redirects_off_site(kitt: Kitt) -> None:
    """Browsers drop tabs and newlines from a Location ("/\t/evil" is "//evil"), so only
    plain visible characters pass; anything else goes to the fleet page."""
    kitt.start_server()
    for target in OFF_SITE:
        with httpx.Client(base_url=kitt.server_url) as client:
            form = client.get("/login", params={"next": target})
            done = client.post("/login", data={"token": kitt.admin_token, "next": target,
                                               "csrf_token": _login_field(form.text)})  # fmt: skip
            assert done.status_code == 303, target
            assert done.headers["location"] == "/fleet", target
            # Signed in now: the login page sends straight on, by the same rule.
            again = client.get("/login", params={"next": target})
            assert again.status_code == 302 and again.headers["location"] == "/fleet", target
            # A path on this server, query and percent-escapes included, is kept.
            kept = client.get("/login", params={"next": "/results?model=a%2Fb&gpu=H100"})
            assert kept.headers["location"] == "/results?model=a%2Fb&gpu=H100"
