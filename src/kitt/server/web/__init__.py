"""The web dashboard: server-rendered pages (Jinja2), a little plain JS, htmx, uPlot.

Pages read and change the fleet through the same REST API as the CLI, authenticated by
the session cookie instead of the bearer token (see ``kitt.server.auth``). No build
step: the vendored libraries are the npm registry's own files, listed with their
versions, licences and SHA-256 in ``static/vendor/VENDORED.md``.
"""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, render_template, request

from kitt import __version__
from kitt.jsonapi import PAGE_ERRORS, error
from kitt.server.auth import CSRF_FIELD, auth
from kitt.server.web import fleet_pages, pages, results_pages, test_pages

# No inline script and nothing from elsewhere: a page that somehow carried injected
# markup still could not run it. (Styles may be inline: uPlot sizes its canvas so.)
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'; object-src 'none'"
)


def install_web(app: Flask) -> None:
    for module in (pages, fleet_pages, test_pages, results_pages):
        app.register_blueprint(module.bp)

    @app.context_processor
    def _globals() -> dict[str, Any]:
        a = auth()
        return {
            "csrf_token": a.csrf_token,
            "csrf_field": CSRF_FIELD,
            "auth_enabled": a.enabled,
            "kitt_version": __version__,
        }

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        if response.mimetype == "text/html":
            response.headers.setdefault("Content-Security-Policy", CSP)
            response.headers.setdefault("X-Frame-Options", "DENY")
        if not request.path.startswith("/static/"):
            # Fleet data and pages are not to be kept by the browser or a proxy.
            response.headers.setdefault("Cache-Control", "no-store")
        return response

    def _page_error(status: int, message: str) -> Any:
        if request.headers.get("HX-Request"):
            return error(status, message)  # htmx shows the message in the page's flash
        a = auth()
        # Someone not signed in learns nothing from an error page: no menu, no version.
        signed_in = a.open_to_this_host() or (a.enabled and a.web_session() is not None)
        page = render_template("error.html", status=status, message=message, signed_in=signed_in)
        return page, status

    app.extensions[PAGE_ERRORS] = _page_error
