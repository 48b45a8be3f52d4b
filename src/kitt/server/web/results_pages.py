"""Results list, comparison view and exports."""

from __future__ import annotations

from flask import Blueprint, render_template

from kitt.server.web.pages import page_guard

bp = Blueprint("results_pages", __name__)
bp.before_request(page_guard)


@bp.get("/results")
def results() -> str:
    return render_template("stub.html", title="Results")
