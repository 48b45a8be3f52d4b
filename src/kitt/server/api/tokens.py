"""Bootstrap tokens, managed by the operator (admin token): create, list, revoke."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from flask import Blueprint, current_app, jsonify

from kitt.jsonapi import ApiFailure, check_id, dump, parse_body
from kitt.protocol import TokenCreate, TokenCreated
from kitt.server.auth import auth, require_admin
from kitt.server.store.credentials import token_info

bp = Blueprint("tokens", __name__, url_prefix="/api/v1/tokens")
bp.before_request(require_admin)


@bp.post("")
def create() -> Any:
    req = parse_body(TokenCreate)
    now = datetime.now(timezone.utc)
    row, token = auth().credentials.create_bootstrap(
        timedelta(seconds=req.ttl_s), req.uses, req.note, now
    )
    current_app.logger.info(
        "bootstrap token %s created (%d use(s), until %s)", row.id, row.max_uses, row.expires_at
    )
    return dump(TokenCreated(token=token, **token_info(row, now).model_dump()), 201)


@bp.get("")
def list_tokens() -> Any:
    now = datetime.now(timezone.utc)
    rows = auth().credentials.list_bootstrap()
    return jsonify(tokens=[token_info(r, now).model_dump(mode="json") for r in rows])


@bp.delete("/<token_id>")
def revoke(token_id: str) -> Any:
    check_id(token_id, "token id")
    now = datetime.now(timezone.utc)
    row = auth().credentials.revoke_bootstrap(token_id, now)
    if row is None:
        raise ApiFailure(404, f"no bootstrap token {token_id!r}")
    current_app.logger.info("bootstrap token %s revoked", token_id)
    return dump(token_info(row, now))
