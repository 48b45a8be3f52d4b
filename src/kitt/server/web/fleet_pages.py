"""Fleet and agent pages."""

from __future__ import annotations

from flask import Blueprint, render_template

from kitt.server.web.pages import page_guard

bp = Blueprint("fleet_pages", __name__)
bp.before_request(page_guard)


@bp.get("/fleet")
def fleet() -> str:
    return render_template("fleet.html")
