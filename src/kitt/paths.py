"""Where KITT keeps its files (ARCHITECTURE.md §3).

Everything hangs off ``KITT_HOME`` (default ``~/.kitt``) so that several agents, or a
server and an agent, can share a host and tests never touch a real home.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kitt.errors import HomeNotWritableError

PRIVATE_FILE = 0o600
PUBLIC_FILE = 0o644  # certificates: public by nature
PRIVATE_DIR = 0o700


def kitt_home() -> Path:
    env = os.environ.get("KITT_HOME")
    return Path(env).expanduser().absolute() if env else Path.home() / ".kitt"


@dataclass(frozen=True)
class AgentPaths:
    home: Path

    @property
    def config(self) -> Path:
        return self.home / "agent.yaml"

    @property
    def pid(self) -> Path:
        return self.home / "agent.pid"

    @property
    def log(self) -> Path:
        return self.home / "agent.log"

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    @property
    def jobs(self) -> Path:
        return self.home / "jobs"

    @property
    def certs(self) -> Path:
        return self.home / "certs"

    @property
    def ca(self) -> Path:
        return self.certs / "ca.pem"

    @property
    def cert(self) -> Path:
        return self.certs / "agent.pem"

    @property
    def key(self) -> Path:
        return self.certs / "agent-key.pem"

    @property
    def venv_link(self) -> Path:
        """``agent-venv``: a link to the installed venv in ``agent-venvs/`` now in use."""
        return self.home / "agent-venv"

    @property
    def venvs(self) -> Path:
        return self.home / "agent-venvs"

    @property
    def login(self) -> Path:
        """Tokens saved by `kitt login URL` for remote servers (0600)."""
        return self.home / "login.json"


@dataclass(frozen=True)
class ServerPaths:
    data_dir: Path

    @classmethod
    def default(cls) -> ServerPaths:
        return cls(kitt_home() / "server")

    @property
    def database(self) -> Path:
        return self.data_dir / "kitt.db"

    @property
    def pid(self) -> Path:
        return self.data_dir / "server.pid"

    @property
    def log(self) -> Path:
        return self.data_dir / "server.log"

    @property
    def endpoint(self) -> Path:
        """Written on start so local CLI commands find the server without flags."""
        return self.data_dir / "endpoint.json"

    @property
    def admin_token(self) -> Path:
        return self.data_dir / "admin-token"

    @property
    def certs(self) -> Path:
        return self.data_dir / "certs"

    @property
    def packages(self) -> Path:
        """The agent wheel the server built of itself, served to installers."""
        return self.data_dir / "packages"

    @property
    def wheelhouse(self) -> Path:
        """Dependency wheels for agents without PyPI (``kitt server wheelhouse``)."""
        return self.data_dir / "wheelhouse"


def agent_paths() -> AgentPaths:
    return AgentPaths(kitt_home())


def ensure_dir(path: Path, mode: int = 0o755) -> Path:
    """Create ``path`` (and parents) or say exactly which folder cannot be written."""
    missing = []
    for parent in [path, *path.parents]:
        if parent.exists():
            break
        missing.append(parent)
    try:
        # Each new folder gets ``mode`` (mkdir(parents=True) would give new parents, such as
        # KITT_HOME itself, the umask's mode instead).
        for folder in reversed(missing):
            folder.mkdir(mode=mode, exist_ok=True)
        path.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as exc:
        raise HomeNotWritableError(f"cannot create {path}: {exc.strerror or exc}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise HomeNotWritableError(f"{path} is not writable by this user")
    return path


def write_private(
    path: Path, data: str | bytes, mode: int = PRIVATE_FILE, *, fsync: bool = True
) -> None:
    """Write a file atomically with ``mode`` from its first byte.

    The temp file is created 0600 in the same folder and renamed over the target, so a
    reader sees the old or the new content, never a half-written or world-readable file.
    ``fsync=False`` keeps that guarantee across a process crash but not a power cut.
    """
    ensure_dir(path.parent, PRIVATE_DIR)
    raw = data.encode() if isinstance(data, str) else data
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise HomeNotWritableError(f"cannot write in {path.parent}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
