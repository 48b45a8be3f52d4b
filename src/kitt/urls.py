"""Validation of the server URLs users type, with messages that say what is wrong."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit


def validate_server_url(url: str) -> str:
    """Return ``url`` normalised (no trailing slash) or raise ``ValueError`` saying why not."""
    text = url.strip()
    if not text:
        raise ValueError("server URL is empty")
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https"):
        raise ValueError(
            f"server URL {text!r} must start with http:// or https:// "
            "(for example https://kitt-server:8080)"
        )
    if not parts.hostname:
        raise ValueError(f"server URL {text!r} has no host name")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"server URL {text!r} has an invalid port (use 1-65535)") from None
    if port == 0:
        raise ValueError(f"server URL {text!r} has an invalid port (use 1-65535)")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError(f"server URL {text!r} must not contain credentials, ? or #")
    if parts.path not in ("", "/"):
        raise ValueError(
            f"server URL {text!r} must not have a path ({parts.path!r}); give only "
            "scheme, host and port"
        )
    return f"{parts.scheme}://{parts.netloc}"


def is_loopback(host: str) -> bool:
    """Whether listening on ``host`` keeps a port off the network (no TLS needed there)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
