"""Installing a new agent version beside the running one, switching to it, undoing it.

Layout (made by the install script, kept by ``kitt-agent update``)::

    $KITT_HOME/agent-venvs/<version>-<sha256[:12]>/   one venv per wheel installed
    $KITT_HOME/agent-venv -> agent-venvs/<…>           the one in use

Venvs cannot be moved (their scripts name their own path), so a new version is built in
its own folder while the old one keeps running, and the switch is one atomic rename of
the link. The systemd unit names ``agent-venv/bin/kitt-agent``, so a restart is all a
switch needs. The previous venv is kept, so the daemon still running from it is never
pulled from under its feet, and a failed activation goes back to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from pydantic import ValidationError

from kitt.errors import KittError, ServerUnreachableError
from kitt.http import TlsFiles, build_client, error_message
from kitt.paths import AgentPaths, write_private
from kitt.protocol import AgentPackageInfo

log = logging.getLogger(__name__)

INSTALLED_MARKER = ".kitt-installed"  # holds the SHA-256 of the wheel a venv was built from
_UNIT_NAME = re.compile(r"[A-Za-z0-9:_.@\\-]+\.service")

Echo = Callable[[str], None]


class UpgradeError(KittError):
    """Downloading, checking, installing or switching to a new agent version failed."""


@dataclass(frozen=True)
class Download:
    info: AgentPackageInfo
    wheel: Path


def download_package(server_url: str, ca: Path | None, dest: Path) -> Download:
    """The server's agent wheel in ``dest``, after its SHA-256 matched the announced one."""
    tls = TlsFiles(ca=ca) if server_url.startswith("https://") else None
    try:
        with build_client(server_url, tls=tls, timeout=600) as client:
            meta = client.get("/api/v1/agent/package.json")
            if meta.status_code != 200:
                raise UpgradeError(
                    f"{server_url} did not describe its agent package "
                    f"({meta.status_code}: {error_message(meta)})"
                )
            try:
                info = AgentPackageInfo.model_validate_json(meta.content)
            except ValidationError:
                raise UpgradeError(
                    f"{server_url} sent a package description KITT cannot read"
                ) from None
            # Both become file names here: nothing from the network may steer a path.
            if not (
                re.fullmatch(r"kitt_fleet-[A-Za-z0-9.+!_-]{1,100}\.whl", info.filename)
                and re.fullmatch(r"[A-Za-z0-9.+!_-]{1,64}", info.version)
                and re.fullmatch(r"[0-9a-f]{64}", info.sha256)
            ):
                raise UpgradeError(f"{server_url} describes its package in an unexpected way")
            wheel = dest / info.filename
            digest = hashlib.sha256()
            with client.stream("GET", "/api/v1/agent/package") as response:
                if response.status_code != 200:
                    raise UpgradeError(
                        f"{server_url} did not hand out its agent package ({response.status_code})"
                    )
                with wheel.open("wb") as fh:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        fh.write(chunk)
    except httpx.TransportError as exc:
        raise ServerUnreachableError(f"cannot download the agent from {server_url}: {exc}") from exc
    if digest.hexdigest() != info.sha256:
        wheel.unlink(missing_ok=True)
        raise UpgradeError(
            f"the agent package from {server_url} has SHA-256 {digest.hexdigest()}, not the "
            f"{info.sha256} the server announced: refusing to install it (corrupted or "
            "tampered with in transit)"
        )
    return Download(info, wheel)


def venv_dir(paths: AgentPaths, info: AgentPackageInfo) -> Path:
    return paths.venvs / f"{info.version}-{info.sha256[:12]}"


def installed_sha(prefix: Path) -> str | None:
    """The SHA-256 of the wheel the venv at ``prefix`` was built from (None: not ours)."""
    try:
        return (prefix / INSTALLED_MARKER).read_text().strip() or None
    except OSError:
        return None


def base_python() -> str:
    """The system interpreter behind this venv: new venvs are made from it, not nested."""
    return getattr(sys, "_base_executable", None) or sys.executable


def build_venv(
    dest: Path, download: Download, server_url: str, ca: Path | None, echo: Echo
) -> bool:
    """Install the downloaded wheel into a fresh venv at ``dest`` (kept if already built
    from this very wheel). Returns whether it was created now."""
    if installed_sha(dest) == download.info.sha256 and (dest / "bin" / "kitt-agent").exists():
        echo(f"kitt {download.info.version} is already installed in {dest}")
        return False
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        _run([base_python(), "-m", "venv", str(dest)], "create the venv")
        pip = [str(dest / "bin" / "python"), "-m", "pip", "install", "--quiet",
               "--disable-pip-version-check", "--no-input"]  # fmt: skip
        if download.info.wheelhouse:
            pip += ["--no-index", "--find-links", f"{server_url}/api/v1/agent/wheels/"]
            if ca is not None:
                pip += ["--cert", str(ca)]
        echo(f"installing kitt {download.info.version} into {dest}")
        _run([*pip, str(download.wheel)], "install the agent package")
        (dest / INSTALLED_MARKER).write_text(download.info.sha256 + "\n")
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return True


def _run(argv: list[str], what: str) -> None:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=1800, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UpgradeError(f"could not {what}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise UpgradeError(f"could not {what}: " + " / ".join(tail))


# --- the switch ------------------------------------------------------------------------


def link_target(paths: AgentPaths) -> Path | None:
    link = paths.venv_link
    return Path(os.path.realpath(link)) if link.is_symlink() else None


def switch_link(paths: AgentPaths, venv: Path) -> Path | None:
    """Point ``agent-venv`` at ``venv`` in one rename. An ``agent-venv`` that is a real
    folder (installed by hand) is moved into ``agent-venvs/`` first; returns where to."""
    link = paths.venv_link
    moved = None
    if link.exists() and not link.is_symlink():
        moved = paths.venvs / f"manual-{os.getpid()}"
        paths.venvs.mkdir(parents=True, exist_ok=True)
        link.rename(moved)
    tmp = link.with_name(f".agent-venv.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(os.path.relpath(venv, link.parent))
    tmp.replace(link)
    return moved


def prune_venvs(paths: AgentPaths, keep: set[Path], echo: Echo) -> None:
    """Remove venvs no longer in use or kept for going back."""
    if not paths.venvs.is_dir():
        return
    keep = {Path(os.path.realpath(k)) for k in keep}
    for venv in paths.venvs.iterdir():
        if venv.is_dir() and Path(os.path.realpath(venv)) not in keep:
            shutil.rmtree(venv, ignore_errors=True)
            echo(f"removed the old {venv}")


def systemd_unit_of(pid: int) -> str | None:
    """The systemd service a process runs in (from its cgroup), if any."""
    try:
        return unit_in_cgroup(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None


def unit_in_cgroup(text: str) -> str | None:
    """``0::/system.slice/kitt-agent.service`` → ``kitt-agent.service``.

    Only a service that is the process's own cgroup counts, and never ``user@….service``:
    a daemon started from a desktop terminal lives *below* the user's session manager,
    which must not be mistaken for the agent's unit (restarting it logs the user out).
    """
    for line in text.splitlines():
        leaf = line.split(":", 2)[-1].rstrip("/").rsplit("/", 1)[-1]
        if _UNIT_NAME.fullmatch(leaf) and not leaf.startswith("user@"):
            return leaf
    return None


# --- undo ------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """The agent's identity files and venv link before an activation, to put back."""

    files: dict[Path, bytes | None] = field(default_factory=dict)
    link: Path | None = None
    modes: dict[Path, int] = field(default_factory=dict)
    moved: Path | None = None  # a hand-made agent-venv folder switch_link moved aside

    @classmethod
    def take(cls, paths: AgentPaths, config: Path) -> Snapshot:
        snap = cls(link=link_target(paths))
        for path in (config, paths.ca, paths.cert, paths.key):
            try:
                snap.files[path] = path.read_bytes()
                snap.modes[path] = path.stat().st_mode & 0o777
            except FileNotFoundError:
                snap.files[path] = None
        return snap

    def restore(self, paths: AgentPaths) -> None:
        for path, data in self.files.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                write_private(path, data, self.modes.get(path, 0o600))
        if self.link is not None:
            switch_link(paths, self.link)
            return
        with contextlib.suppress(FileNotFoundError):
            if paths.venv_link.is_symlink():
                paths.venv_link.unlink()
        if self.moved is not None and self.moved.is_dir():
            self.moved.rename(paths.venv_link)
