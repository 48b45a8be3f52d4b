"""Login, logout, the front page, static files, and the guard every page passes."""

from __future__ import annotations

import re
import secrets
import threading
import time
from collections import deque
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, make_response, redirect, render_template, request, url_for

from kitt.server.auth import CSRF_FIELD, SAFE_METHODS, auth
from kitt.tokens import same

HERE = Path(__file__).parent
bp = Blueprint(
    "web",
    __name__,
    static_folder=str(HERE / "static"),
    static_url_path="/static",
    template_folder=str(HERE / "templates"),
)

SESSION_TTL = timedelta(hours=12)
LOGIN_CSRF_COOKIE = "kitt_login_csrf"
# Failed logins from one address: at most this many per window, then 429.
LOGIN_FAILURES = 10
LOGIN_WINDOW_S = 300.0


class LoginThrottle:
    """Slows down guessing at the login form. (The token is 256 random bits, so this is
    about noise in the log and load on the server more than about the odds.)"""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._failures: dict[str, deque[float]] = {}

    def _recent(self, who: str, now: float) -> deque[float]:
        times = self._failures.setdefault(who, deque())
        while times and times[0] <= now - LOGIN_WINDOW_S:
            times.popleft()
        return times

    def retry_after(self, who: str) -> int:
        now = time.monotonic()
        with self._lock:
            times = self._recent(who, now)
            if len(times) < LOGIN_FAILURES:
                return 0
            return max(1, int(times[0] + LOGIN_WINDOW_S - now) + 1)

    def failed(self, who: str) -> None:
        now = time.monotonic()
        with self._lock:
            self._recent(who, now).append(now)
            if len(self._failures) > 10_000:  # bounded memory under a spray of addresses
                self._failures = {k: v for k, v in self._failures.items() if v}


_throttle = LoginThrottle()


# A path on this server: one "/" then printable ASCII without spaces or backslashes.
# Browsers drop tabs and newlines from URLs ("/\t/evil" is "//evil"), so anything but
# plain visible characters is refused rather than cleaned.
_LOCAL_PATH = re.compile(r"/(?![/\\])[\x21-\x5b\x5d-\x7e]*")


def safe_next(target: str | None) -> str:
    """Only a path on this server: never an open redirect to another site."""
    if not target or not _LOCAL_PATH.fullmatch(target):
        return url_for("fleet_pages.fleet")
    return target


def page_guard() -> Any:
    """``before_request`` of every page blueprint: a session (or --no-auth), and the CSRF
    token on anything that changes something."""
    a = auth()
    a.open_server_guard()
    if a.enabled and a.web_session() is None:
        if request.method not in SAFE_METHODS or request.headers.get("HX-Request"):
            response = make_response(("login needed", 401))
            response.headers["HX-Redirect"] = url_for("web.login")
            return response
        return redirect(url_for("web.login", next=request.full_path.rstrip("?")))
    a.require_csrf()
    return None


@bp.get("/")
def index() -> Any:
    return redirect(url_for("fleet_pages.fleet"))


def _login_page(error: str | None, status: int, next_url: str) -> Response:
    token = secrets.token_urlsafe(32)
    response = make_response(
        render_template("login.html", error=error, login_csrf=token, next_url=next_url), status
    )
    # Login CSRF (double submit): another site cannot read this cookie to copy it into
    # the form, so it cannot log a victim's browser in to anything.
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, httponly=True, samesite="Strict", secure=auth().tls,
        path="/login", max_age=3600,
    )  # fmt: skip
    return response


@bp.get("/login")
def login() -> Any:
    next_url = safe_next(request.args.get("next"))
    if not auth().enabled or auth().web_session() is not None:
        return redirect(next_url)
    return _login_page(None, 200, next_url)


@bp.post("/login")
def login_submit() -> Any:
    a = auth()
    next_url = safe_next(request.form.get("next"))
    if not a.enabled:
        return redirect(next_url)
    who = request.remote_addr or "?"
    wait = _throttle.retry_after(who)
    if wait:
        response = _login_page(f"Too many failed logins: try again in {wait} s.", 429, next_url)
        response.headers["Retry-After"] = str(wait)
        return response
    sent = request.form.get(CSRF_FIELD, "")
    cookie = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not sent or not cookie or not same(sent, cookie):
        return _login_page("The form expired: please sign in again.", 403, next_url)
    token = request.form.get("token", "").strip()
    if not token:
        return _login_page("Enter the admin token.", 400, next_url)
    if not a.admin_token_ok(token):
        _throttle.failed(who)
        return _login_page(
            "Admin token not accepted. It is in the server's admin-token file "
            "(~/.kitt/server/admin-token by default, readable by the server's user only).",
            401,
            next_url,
        )
    assert a.web_sessions is not None  # noqa: S101 (an enabled server always has the store)
    secret, _ = a.web_sessions.open(a.admin_fp, datetime.now(timezone.utc), SESSION_TTL)
    done = redirect(next_url, 303)
    done.set_cookie(
        a.cookie_name, secret, httponly=True, samesite="Strict", secure=a.tls, path="/",
        max_age=int(SESSION_TTL.total_seconds()),
    )  # fmt: skip
    done.delete_cookie(LOGIN_CSRF_COOKIE, path="/login")
    return done


@bp.post("/logout")
def logout() -> Any:
    a = auth()
    session = a.web_session()
    if session is not None:
        a.require_csrf()
        assert a.web_sessions is not None  # noqa: S101
        a.web_sessions.close(session.id_hash)
    response = redirect(url_for("web.login"), 303)
    response.delete_cookie(a.cookie_name, path="/", secure=a.tls, samesite="Strict")
    return response
