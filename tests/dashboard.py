"""Driving the dashboard in a real browser: Debian's Chromium under Playwright.

The browser is never downloaded: it is ``/usr/bin/chromium`` (``apt-get install
chromium``; ``.ci/run`` installs it and sets KITT_REQUIRE_BROWSER=1, so CI fails rather
than skips when it is missing). Screenshots go to ``$KITT_SCREENSHOTS`` when set (that is
how docs/images/ is made), else into the test's temp folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from conftest import Kitt

CHROMIUM = Path(os.environ.get("KITT_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Playwright's own waits (expect, wait_for_*) are deadlines, never sleeps.
TIMEOUT_MS = 15_000


def launch_browser() -> Iterator[Any]:
    if not CHROMIUM.exists():
        message = f"{CHROMIUM} not found (apt-get install chromium)"
        if os.environ.get("KITT_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class Dashboard:
    """One browser context (its own cookies) against one sandbox's server."""

    kitt: Kitt
    page: Any  # playwright.sync_api.Page
    shots: Path
    https: bool = False  # set when the sandbox's server runs TLS

    @property
    def base_url(self) -> str:
        return self.kitt.tls_url if self.https else self.kitt.server_url

    @property
    def token(self) -> str:
        return self.kitt.admin_token

    def url(self, path: str) -> str:
        return self.base_url + path

    def goto(self, path: str) -> Any:
        return self.page.goto(self.url(path))

    def login(self, token: str | None = None) -> None:
        from playwright.sync_api import expect

        self.goto("/login")
        self.page.get_by_label("Admin token").fill(token if token is not None else self.token)
        self.page.get_by_role("button", name="Sign in").click()
        expect(self.page).to_have_url(re.compile(r"/fleet"))

    def logout(self) -> None:
        from playwright.sync_api import expect

        self.page.get_by_role("button", name="Sign out").click()
        expect(self.page).to_have_url(re.compile(r"/login"))

    def shot(self, name: str, full_page: bool = True) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def cookies(self) -> dict[str, dict[str, Any]]:
        return {c["name"]: c for c in self.page.context.cookies()}
