"""Filling the server's wheelhouse: the agent's dependencies for offline installs.

pip does the work (``pip download``): it resolves the agent wheel's own requirements,
so the wheelhouse always matches the package the server hands out.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from kitt.errors import KittError
from kitt.paths import ensure_dir
from kitt.server.package import build_wheel, wheelhouse_files


def fill_wheelhouse(
    dest: Path,
    python_versions: Sequence[str],
    platforms: Sequence[str],
    echo: Callable[[str], None],
) -> list[Path]:
    ensure_dir(dest)
    with tempfile.TemporaryDirectory(prefix="kitt-wheel-") as tmp:
        package = build_wheel(Path(tmp))
        versions: list[str | None] = [*python_versions] or [None]
        for version in versions:
            argv = [sys.executable, "-m", "pip", "download", "--disable-pip-version-check",
                    "--quiet", "--dest", str(dest)]  # fmt: skip
            if version or platforms:
                # Another interpreter or machine: only wheels can be trusted to fit it.
                argv += ["--only-binary=:all:"]
                argv += ["--python-version", version] if version else []
                for platform in platforms:
                    argv += ["--platform", platform]
            echo(f"pip download for Python {version or sys.version.split()[0]}…")
            try:
                subprocess.run([*argv, str(package.path)], check=True)
            except (OSError, subprocess.CalledProcessError) as exc:
                raise KittError(f"pip download failed ({exc}); see pip's message above") from exc
    (dest / package.filename).unlink(missing_ok=True)  # the server serves its own copy
    return list(wheelhouse_files(dest).values())
