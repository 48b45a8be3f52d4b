"""Run-a-test form, test list and test page."""

from __future__ import annotations

from flask import Blueprint, render_template

from kitt.server.web.pages import page_guard

bp = Blueprint("test_pages", __name__)
bp.before_request(page_guard)


@bp.get("/tests/new")
def new_test() -> str:
    return render_template("stub.html", title="Run a test")


@bp.get("/tests")
def tests() -> str:
    return render_template("stub.html", title="Tests")


@bp.get("/tests/<test_id>")
def test(test_id: str) -> str:
    return render_template("stub.html", title=f"Test {test_id}")
