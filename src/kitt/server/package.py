"""The agent software the server hands out: its own code as a wheel, plus a wheelhouse.

The wheel is assembled from the package the server itself runs (the installed
``kitt`` modules and the distribution's metadata), so an agent installed from a server
runs exactly the server's code, whatever way the server was installed (a release
wheel, a source checkout). The build is reproducible: sorted entries, fixed
timestamps and modes, so two servers of one version serve byte-identical wheels
with the same SHA-256. An operator may instead ship a wheel (``--agent-package``).

The optional wheelhouse holds the agent's dependencies as wheels (``kitt server
wheelhouse`` fills it with ``pip download``), so a GPU box with no route to PyPI can
install everything from the server alone.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import io
import logging
import re
import zipfile
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path

import kitt
from kitt.errors import ConfigError, KittError
from kitt.paths import PUBLIC_FILE, ensure_dir, write_private

log = logging.getLogger(__name__)

DISTRIBUTION = "kitt-fleet"
WHEEL_PREFIX = "kitt_fleet-"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can say: no build time leaks in
_SKIP_DIRS = frozenset({"__pycache__"})
_SKIP_SUFFIXES = (".pyc", ".pyo")
# A wheelhouse file name as pip writes it: no separators, no leading dot.
WHEEL_FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*\.(whl|tar\.gz|zip)$")


class PackageError(KittError):
    """The agent package cannot be built, or a shipped one is not a KITT agent wheel."""


@dataclass(frozen=True)
class AgentPackage:
    """A wheel on disk and what an installer must check it against."""

    path: Path
    version: str
    sha256: str
    size: int

    @property
    def filename(self) -> str:
        return self.path.name


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _package_files(root: Path) -> list[tuple[str, bytes]]:
    """Every file of the running ``kitt`` package, as (archive name, bytes), sorted."""
    files = []
    for path in root.rglob("*"):
        rel = path.relative_to(root.parent)
        if path.is_dir() or _SKIP_DIRS.intersection(rel.parts) or path.suffix in _SKIP_SUFFIXES:
            continue
        files.append((rel.as_posix(), path.read_bytes()))
    return sorted(files)


def _metadata() -> tuple[str, str, str]:
    """(version, METADATA text, entry_points.txt text) of the installed distribution."""
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise PackageError(
            f"the {DISTRIBUTION} distribution is not installed (running from a bare source "
            "tree?): install it with pip, or ship a wheel with --agent-package"
        ) from None
    metadata = dist.read_text("METADATA")
    entry_points = dist.read_text("entry_points.txt")
    if not metadata or not entry_points:
        raise PackageError(f"the installed {DISTRIBUTION} has no METADATA or entry points")
    if dist.version != kitt.__version__:
        raise PackageError(
            f"the installed {DISTRIBUTION} metadata says {dist.version} but the running code "
            f"is {kitt.__version__}: reinstall it (pip install -e . in a checkout)"
        )
    return dist.version, metadata, entry_points


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=_ZIP_EPOCH)
    info.external_attr = (0o100000 | PUBLIC_FILE) << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    return info


def build_wheel(dest_dir: Path) -> AgentPackage:
    """Write ``kitt_fleet-<version>-py3-none-any.whl`` of the running code into ``dest_dir``."""
    version, metadata, entry_points = _metadata()
    root = Path(kitt.__file__).parent
    dist_info = f"{WHEEL_PREFIX}{version}.dist-info"
    wheel_meta = (
        "Wheel-Version: 1.0\nGenerator: kitt server (agent package)\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n"
    )
    entries = [
        *_package_files(root),
        (f"{dist_info}/METADATA", metadata.encode()),
        (f"{dist_info}/WHEEL", wheel_meta.encode()),
        (f"{dist_info}/entry_points.txt", entry_points.encode()),
    ]
    record = "".join(f"{name},{_record_hash(data)},{len(data)}\n" for name, data in entries)
    entries.append((f"{dist_info}/RECORD", (record + f"{dist_info}/RECORD,,\n").encode()))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in entries:
            archive.writestr(_zip_entry(name), data, compresslevel=9)
    ensure_dir(dest_dir)
    path = dest_dir / f"{WHEEL_PREFIX}{version}-py3-none-any.whl"
    write_private(path, buffer.getvalue(), PUBLIC_FILE)
    return AgentPackage(
        path=path, version=version, sha256=sha256_file(path), size=path.stat().st_size
    )


def load_wheel(path: Path) -> AgentPackage:
    """A wheel the operator ships (``--agent-package``), checked to be a KITT agent wheel."""
    if not path.name.startswith(WHEEL_PREFIX) or not path.name.endswith(".whl"):
        raise ConfigError(f"--agent-package {path}: expected a {WHEEL_PREFIX}*.whl file")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            meta_name = next(
                (n for n in names if re.fullmatch(r"kitt_fleet-[^/]+\.dist-info/METADATA", n)), None
            )
            if meta_name is None or "kitt/__init__.py" not in names:
                raise ConfigError(f"--agent-package {path} is not a KITT agent wheel")
            headers = HeaderParser().parsestr(archive.read(meta_name).decode("utf-8", "replace"))
    except (OSError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"--agent-package {path}: cannot read it as a wheel ({exc})") from None
    version = headers.get("Version")
    if headers.get("Name", "").lower().replace("_", "-") != DISTRIBUTION or not version:
        raise ConfigError(f"--agent-package {path}: its metadata does not name {DISTRIBUTION}")
    return AgentPackage(
        path=path.absolute(), version=version, sha256=sha256_file(path), size=path.stat().st_size
    )


def wheelhouse_files(wheelhouse: Path | None) -> dict[str, Path]:
    """The dependency wheels an installer may fetch, by file name (nothing else is served)."""
    if wheelhouse is None or not wheelhouse.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(wheelhouse.iterdir())
        if p.is_file() and WHEEL_FILE_RE.match(p.name) and not p.name.startswith(WHEEL_PREFIX)
    }
