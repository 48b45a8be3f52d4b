"""What a new GPU machine downloads: the install script, the agent wheel, its wheelhouse.

All of it is public by design (ARCHITECTURE.md §4): no secret is in any of it, and a
fetch changes nothing on the server. What makes an install safe is elsewhere: the
fleet CA authenticates the server, the announced SHA-256 is checked before the wheel
is installed, and only a bootstrap token (given out of band) enrolls an agent.
"""

from __future__ import annotations

import hashlib
import html
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, send_file

from kitt import __version__
from kitt.jsonapi import ApiFailure, dump
from kitt.protocol import AgentPackageInfo
from kitt.server.package import DISTRIBUTION, AgentPackage, sha256_file, wheelhouse_files

bp = Blueprint("agent_package", __name__)

_URL_PLACEHOLDER = "'@KITT_SERVER_URL@'"
# What may be written into the script between single quotes: a plain URL, nothing a
# shell would interpret.
_SAFE_URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+$")


def render_install_script(server_url: str) -> bytes:
    """The installer with this server's URL as its default ``--server``."""
    template = resources.files("kitt.agent").joinpath("install.sh").read_text(encoding="utf-8")
    url = server_url if _SAFE_URL.match(server_url) else ""
    return template.replace(_URL_PLACEHOLDER, f"'{url}'", 1).encode()


@dataclass(frozen=True)
class AgentDownloads:
    """Everything the endpoints serve, fixed at server start (so every fetch is static)."""

    package: AgentPackage
    install_script: bytes
    install_script_sha256: str
    server_url: str
    wheels: dict[str, tuple[Path, str]]  # file name → (path, sha256)

    @classmethod
    def prepare(
        cls, package: AgentPackage, server_url: str, wheelhouse: Path | None
    ) -> AgentDownloads:
        wheels = {name: (p, sha256_file(p)) for name, p in wheelhouse_files(wheelhouse).items()}
        script = render_install_script(server_url)
        return cls(package, script, hashlib.sha256(script).hexdigest(), server_url, wheels)

    def info(self) -> AgentPackageInfo:
        return AgentPackageInfo(
            name=DISTRIBUTION,
            version=self.package.version,
            filename=self.package.filename,
            sha256=self.package.sha256,
            size=self.package.size,
            server_version=__version__,
            server_url=self.server_url,
            wheelhouse=bool(self.wheels),
            install_sh_sha256=self.install_script_sha256,
        )


def _downloads() -> AgentDownloads:
    downloads: AgentDownloads | None = current_app.extensions.get("kitt.downloads")
    if downloads is None:
        raise ApiFailure(404, "this server does not hand out the agent software")
    return downloads


@bp.get("/api/v1/agent/install.sh")
def install_script() -> Any:
    return Response(
        _downloads().install_script,
        mimetype="text/x-shellscript",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


@bp.get("/api/v1/agent/package.json")
def package_info() -> Any:
    return dump(_downloads().info())


@bp.get("/api/v1/agent/package")
def package() -> Any:
    pkg = _downloads().package
    response = send_file(
        pkg.path,
        mimetype="application/octet-stream",
        as_attachment=True,
        download_name=pkg.filename,
        etag=pkg.sha256,
        max_age=0,
    )
    response.headers["X-Kitt-Sha256"] = pkg.sha256
    response.headers["X-Kitt-Version"] = pkg.version
    return response


@bp.get("/api/v1/agent/wheels/")
def wheel_index() -> Any:
    """A pip ``--find-links`` page: one link per wheel, with its hash for pip to check."""
    links = "".join(
        f'<a href="{html.escape(name)}#sha256={sha}">{html.escape(name)}</a><br>\n'
        for name, (_, sha) in sorted(_downloads().wheels.items())
    )
    page = (
        "<!DOCTYPE html>\n<html><head><title>KITT agent wheelhouse</title></head><body>\n"
        f"{links}</body></html>\n"
    )
    return Response(page, mimetype="text/html")


@bp.get("/api/v1/agent/wheels/<filename>")
def wheel(filename: str) -> Any:
    # Only names listed at start are served: the name is a key, never a path.
    entry = _downloads().wheels.get(filename)
    if entry is None:
        raise ApiFailure(404, f"no wheel named {filename!r} in this server's wheelhouse")
    return send_file(entry[0], mimetype="application/octet-stream", download_name=filename)
