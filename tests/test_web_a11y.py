"""Every dashboard page against WCAG 2.1 A and AA rules, checked by axe-core in the real
browser (labels, names, contrast, landmarks, ARIA use), and reachable by keyboard.

axe-core is a test-only file (tests/vendor/README.md). The pages forbid inline scripts,
so this test's browser context bypasses the CSP to inject it; nothing else changes.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from conftest import Kitt, wait_for
from dashboard import TIMEOUT_MS, Dashboard
from test_web_results import A, B

AXE = Path(__file__).parent / "vendor" / "axe-core-4.14.1" / "axe.min.js"
RULES = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]
GPUS = [{"name": "NVIDIA H100 80GB HBM3", "utilization_pct": 40, "memory_used_gb": 20.0,
         "memory_total_gb": 80.0, "temperature_c": 50, "power_w": 300}]  # fmt: skip


@pytest.fixture
def board(kitt: Kitt, browser: Any, tmp_path: Path) -> Iterator[Dashboard]:
    context = browser.new_context(viewport={"width": 1440, "height": 900}, bypass_csp=True)
    context.set_default_timeout(TIMEOUT_MS)
    yield Dashboard(kitt, context.new_page(), tmp_path)
    context.close()


def violations(board: Dashboard) -> list[str]:
    page = board.page
    page.add_script_tag(path=str(AXE))
    found = page.evaluate(
        """async (tags) => {
            const r = await axe.run(document, {runOnly: {type: "tag", values: tags}});
            return r.violations.map(v => v.id + " (" + v.impact + "): " + v.help + " at " +
                v.nodes.slice(0, 3).map(n => n.target.join(" ")).join(", "));
        }""",
        RULES,
    )
    return list(found)


def test_every_page_meets_wcag_aa(kitt: Kitt, board: Dashboard) -> None:
    kitt.fake_gpus(GPUS)
    kitt.start_server()
    kitt.init_agent("gpu-01")
    kitt.add_benchmark("lines", "lines_and_result.py")
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent("gpu-01").get("status") == "idle", what="agent idle")
    test = kitt.submit("lines", LINES=3)
    kitt.wait_status(test["id"], "completed")
    ids = [kitt.api("POST", "/api/v1/results", json=doc).json()["id"] for doc in (A, B)]

    page = board.page
    board.goto("/login")
    assert violations(board) == [], "/login"
    board.login()
    # Each page with what shows its scripts have run (live pages keep a stream open, so
    # the network never goes idle): checked only once the page is complete.
    pages = {
        "/fleet": "#live:text('live')",
        "/fleet/gpu-01": "#chart-util figure",
        "/tests/new": "form",
        "/tests": "main table",
        f"/tests/{test['id']}": "#log-state:text('Ended')",
        "/results": "main table",
        f"/results/compare?ids={ids[0]},{ids[1]}": "#chart-ttft figure",
    }
    found = {}
    for path, ready in pages.items():
        board.goto(path)
        expect(page.locator(ready).first).to_be_visible()
        found[path] = violations(board)
    # A form with its error messages is a page too.
    board.goto("/tests/new")
    page.get_by_role("button", name="Queue the test").click()
    expect(page.locator("[aria-invalid=true]").first).to_be_visible()
    found["/tests/new (errors)"] = violations(board)
    assert {path: v for path, v in found.items() if v} == {}
    # The checker does see faults: an input with no label, in low-contrast text.
    page.evaluate("""() => {
        const p = document.createElement("p");
        p.style.color = "#bbb"; p.textContent = "faint";
        document.querySelector("main").append(document.createElement("input"), p);
    }""")
    seen = " ".join(violations(board))
    assert "label" in seen and "color-contrast" in seen, seen


def test_keyboard_reaches_the_main_controls(kitt: Kitt, board: Dashboard) -> None:
    """Tab order starts with "Skip to content", and the menu and sign-out are reachable."""
    kitt.start_server()
    board.login()
    page = board.page
    page.keyboard.press("Tab")
    expect(page.locator(":focus")).to_have_text("Skip to content")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"#main$"))
    board.goto("/fleet")
    reached = []
    for _ in range(8):
        page.keyboard.press("Tab")
        reached.append(page.evaluate("document.activeElement.textContent.trim()"))
    assert reached[:6] == ["Skip to content", "KITT", "Fleet", "Run a test", "Tests", "Results"]
    assert "Sign out" in reached
