"""The admin token file: made once, 0600, read by the server and by local CLI commands."""

from __future__ import annotations

from pathlib import Path

from kitt.errors import KittError
from kitt.paths import write_private
from kitt.tokens import ADMIN_PREFIX, new_token


def ensure_admin_token(path: Path) -> tuple[str, bool]:
    """The admin token, created if missing. Returns (token, created)."""
    existing = read_admin_token(path)
    if existing is not None:
        return existing, False
    token = new_token(ADMIN_PREFIX)
    write_private(path, token + "\n")
    return token, True


def read_admin_token(path: Path) -> str | None:
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise KittError(f"cannot read the admin token {path}: {exc.strerror}") from exc
    if not text:
        raise KittError(f"the admin token file {path} is empty; delete it to make a new one")
    return text
