"""Building llama.cpp's ``llama-server`` so that machines without a GPU have a real engine.

The llama.cpp sources come from the PyPI sdist of ``llama-cpp-python`` (it vendors a
pinned llama.cpp): PyPI is reachable wherever KITT installs, GitHub may not be; an offline
machine can be handed the sdist with ``KITT_LLAMA_SDIST=path``. The build is cached by
version and backend, so it happens once per machine:

* ``cpu``: a static binary with no GPU code (``<cache>/llama.cpp/<version>/``);
* ``cuda``: ``-DGGML_CUDA=ON`` for the visible GPUs' compute capabilities
  (``<cache>/llama.cpp/<version>-cuda/``); it links the CUDA runtime libraries.

``auto`` (the default, or ``KITT_LLAMA_BACKEND``) picks ``cuda`` where nvcc is installed
and ``nvidia-smi`` lists a GPU: a GPU box is where users expect the engine on the GPU.
``KITT_LLAMA_CMAKE_ARGS`` adds configure flags (a cuBLAS outside the toolkit, llama.cpp's
own options); they are recorded in build-info.json but are no part of the cache key.

The binary is compiled with llama.cpp's default ``GGML_NATIVE=ON`` (``-march=native``):
fastest here, but a cache copied to a machine with an older CPU may die with SIGILL.
:func:`ensure_llama_server` therefore runs ``--version`` on a cached binary and rebuilds
when it does not run.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from kitt.errors import KittError

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
"""The ``llama-cpp-python`` sdist whose vendored llama.cpp is built (pinned: numbers move)."""

CMAKE_FLAGS: tuple[str, ...] = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary that can be copied and cached
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_OPENSSL=OFF",
    # Without these two the configure step downloads a prebuilt web UI: no run-time downloads.
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
)

BACKENDS = ("cpu", "cuda")
BACKEND_CHOICES = ("auto", *BACKENDS)
BACKEND_ENV = "KITT_LLAMA_BACKEND"
SDIST_ENV = "KITT_LLAMA_SDIST"
CMAKE_ARGS_ENV = "KITT_LLAMA_CMAKE_ARGS"
NVCC_FALLBACKS: tuple[Path, ...] = (Path("/usr/local/cuda/bin/nvcc"),)
"""Where CUDA installs nvcc without putting it on PATH (the NVIDIA packages and images)."""

BINARY_NAME = "llama-server"
BUILD_INFO_NAME = "build-info.json"
_TAIL_LINES = 20
_INSTALL_HINT = "install cmake and a C++ compiler: apt-get install cmake g++"
# cmake/make/ninja progress lines; everything else goes to build.log only.
_PROGRESS = re.compile(r"^\[\s*\d+(%|/\d+)\]")


class LlamaCppError(KittError):
    """llama-server cannot be built or run."""


class EngineBuildError(LlamaCppError):
    """Building llama-server failed; the message carries the end of the build output."""


class BuildToolMissingError(EngineBuildError):
    """cmake, a C/C++ compiler or a build tool is missing: the operator must install it."""

    exit_code = 2


class SourceDownloadError(EngineBuildError):
    """The llama-cpp-python sdist could not be fetched (no network, no registry, no pip)."""


def _discard(_line: str) -> None:
    pass


def cache_dir() -> Path:
    """KITT's cache: ``$KITT_CACHE_DIR``, else ``$XDG_CACHE_HOME/kitt``, else ``~/.cache/kitt``.

    Kept apart from KITT_HOME on purpose: tests use a temporary KITT_HOME but must share
    one build of the engine, which takes minutes.
    """
    env = os.environ.get("KITT_CACHE_DIR")
    if env:
        return Path(env).expanduser().absolute()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser().absolute() if xdg else Path.home() / ".cache"
    return base / "kitt"


def find_nvcc(fallbacks: Sequence[Path] = NVCC_FALLBACKS) -> Path | None:
    """CUDA's compiler: ``nvcc`` on PATH, else the first executable of ``fallbacks``."""
    found = shutil.which("nvcc")
    if found:
        return Path(found)
    return next((path for path in fallbacks if _is_executable(path)), None)


def cuda_architectures(nvidia_smi: str = "nvidia-smi") -> list[str]:
    """The visible GPUs' compute capabilities as CMake names them (9.0 → ``"90"``), sorted.

    Empty when ``nvidia-smi`` is missing, fails (no driver, no GPU) or is too old to know
    ``compute_cap``: callers then build for ``native`` or not for CUDA at all.
    """
    try:
        proc = subprocess.run(
            [nvidia_smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return []
    if proc.returncode != 0:
        return []
    caps = {
        f"{int(m.group(1))}{int(m.group(2))}"
        for m in (re.fullmatch(r"\s*(\d+)\.(\d+)\s*", line) for line in proc.stdout.splitlines())
        if m
    }
    return sorted(caps, key=int)


def resolve_backend(
    requested: str | None = None, *, nvcc_fallbacks: Sequence[Path] = NVCC_FALLBACKS
) -> str:
    """``cpu`` or ``cuda``: ``requested``, else ``$KITT_LLAMA_BACKEND``, else ``auto``.

    ``auto`` means CUDA only where both halves are there: nvcc to compile and a GPU that
    ``nvidia-smi`` lists (a CUDA toolkit on a GPU-less build box still gets a CPU build).
    """
    choice = (requested or os.environ.get(BACKEND_ENV) or "auto").strip().lower()
    if choice not in BACKEND_CHOICES:
        source = "--backend" if requested else BACKEND_ENV
        raise LlamaCppError(
            f"unknown llama.cpp backend {choice!r} ({source}): "
            f"use one of {', '.join(BACKEND_CHOICES)}"
        )
    if choice != "auto":
        return choice
    if find_nvcc(nvcc_fallbacks) is not None and cuda_architectures():
        return "cuda"
    return "cpu"


def cmake_flags_for(backend: str, nvcc: Path | None = None, archs: Sequence[str] = ()) -> list[str]:
    """The configure flags of a build: :data:`CMAKE_FLAGS`, plus CUDA's for ``cuda``.

    The compiler is named explicitly because nvcc is often not on PATH; with no known
    compute capability, ``native`` lets nvcc ask the GPUs of the building machine.
    """
    flags = list(CMAKE_FLAGS)
    if backend == "cuda":
        flags += ["-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={';'.join(archs) or 'native'}"]
        if nvcc is not None:
            flags.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
    return flags


def build_dir_for(
    version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path | None = None, backend: str | None = None
) -> Path:
    """Where one version's build for one backend lives: binary, build info, log, lock.

    CPU builds keep the plain version folder (caches from before backends still count);
    other backends get ``<version>-<backend>``, so neither is ever taken for the other.
    """
    resolved = resolve_backend(backend)
    name = version if resolved == "cpu" else f"{version}-{resolved}"
    return (cache or cache_dir()) / "llama.cpp" / name


def cached_binary(
    version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path | None = None, backend: str | None = None
) -> Path:
    return build_dir_for(version, cache, backend) / BINARY_NAME


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_llama_server(
    version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path | None = None, backend: str | None = None
) -> Path | None:
    """The cached build for the backend if there is one, else ``llama-server`` on PATH,
    else None."""
    cached = cached_binary(version, cache, backend)
    if _is_executable(cached):
        return cached
    found = shutil.which(BINARY_NAME)
    return Path(found) if found else None


def read_build_info(
    version: str = LLAMA_CPP_PYTHON_VERSION, cache: Path | None = None, backend: str | None = None
) -> dict[str, Any] | None:
    """The JSON written beside a cached build (None when absent or unreadable)."""
    return _read_info(build_dir_for(version, cache, backend))


def _read_info(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / BUILD_INFO_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def llama_server_version(binary: Path) -> str:
    """What ``llama-server --version`` says, e.g. ``"0.5.0-dev (build 1, commit 0c1e570)"``."""
    try:
        proc = subprocess.run(
            [str(binary), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LlamaCppError(f"cannot run {binary} --version: {exc}") from exc
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise LlamaCppError(
            f"{binary} --version exited with {_describe_exit(proc.returncode)}: "
            f"{_tail(output.splitlines(), 5)}"
        )
    for line in output.splitlines():
        match = re.match(r"\s*version:\s*(.+?)\s*$", line)
        if match:
            return match.group(1)
    raise LlamaCppError(f"{binary} --version printed no version line: {_tail(output.splitlines())}")


def ensure_llama_server(
    *,
    jobs: int | None = None,
    log: Callable[[str], None] = _discard,
    version: str = LLAMA_CPP_PYTHON_VERSION,
    cache: Path | None = None,
    backend: str | None = None,
) -> Path:
    """Return the cached ``llama-server`` for ``backend`` (see :func:`resolve_backend`),
    building it first when there is none (minutes; a CUDA build takes longer).

    A file lock makes concurrent callers (a test and ``kitt demo``) build once: the others
    wait and then find the binary. Build output is streamed to ``log`` as progress lines;
    the full log stays in ``build.log`` beside the binary. A cached binary counts only if
    it runs and its build info names the same backend.
    """
    backend = resolve_backend(backend)
    target_dir = build_dir_for(version, cache, backend)
    try:
        target_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EngineBuildError(f"cannot create the engine cache {target_dir}: {exc}") from exc
    binary = target_dir / BINARY_NAME
    if _usable(binary, backend):
        return binary
    with _build_lock(target_dir, log):
        if _usable(binary, backend):  # another process built it while we waited
            return binary
        if binary.exists():
            log(f"cached {binary} is not a working {backend} build here: rebuilding")
        _build(version, target_dir, backend, jobs or os.cpu_count() or 1, log)
    return binary


def _usable(binary: Path, backend: str) -> bool:
    """Runs, and was built for ``backend`` (build info without one predates backends: CPU)."""
    info = _read_info(binary.parent) or {}
    return info.get("backend", "cpu") == backend and _runs(binary)


def _runs(binary: Path) -> bool:
    if not _is_executable(binary):
        return False
    try:
        llama_server_version(binary)
    except LlamaCppError:
        return False
    return True


@contextlib.contextmanager
def _build_lock(directory: Path, log: Callable[[str], None]) -> Iterator[None]:
    with (directory / ".lock").open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log("another process is building llama-server: waiting for it")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _check_tools() -> list[str]:
    """Fail before a 75 MB download when the tools are missing; return the generator args."""
    if shutil.which("cmake") is None:
        raise BuildToolMissingError(f"cmake not found: {_INSTALL_HINT}")
    cxx = os.environ.get("CXX") or next(
        (c for c in ("c++", "g++", "clang++") if shutil.which(c)), None
    )
    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not cxx or not cc:
        raise BuildToolMissingError(f"no C/C++ compiler found: {_INSTALL_HINT}")
    if shutil.which("ninja"):
        return ["-G", "Ninja"]
    if shutil.which("make"):
        return ["-G", "Unix Makefiles"]
    raise BuildToolMissingError(f"neither make nor ninja found: {_INSTALL_HINT} make")


def _build(
    version: str, target_dir: Path, backend: str, jobs: int, log: Callable[[str], None]
) -> None:
    generator = _check_tools()
    nvcc: Path | None = None
    archs: list[str] = []
    if backend == "cuda":
        nvcc = find_nvcc()
        if nvcc is None:
            raise BuildToolMissingError(
                "a CUDA build needs nvcc (on PATH or /usr/local/cuda/bin): install the CUDA "
                f"toolkit, or build for the CPU with --backend cpu ({BACKEND_ENV}=cpu)"
            )
        archs = cuda_architectures()
    try:
        extra = shlex.split(os.environ.get(CMAKE_ARGS_ENV, ""))
    except ValueError as exc:
        raise EngineBuildError(f"{CMAKE_ARGS_ENV}: {exc}") from None
    flags = cmake_flags_for(backend, nvcc, archs) + extra
    log_path = target_dir / "build.log"
    with (
        tempfile.TemporaryDirectory(prefix="kitt-llama-build-") as tmp,
        log_path.open("w", encoding="utf-8") as build_log,
    ):
        try:
            info = _build_in(Path(tmp), version, target_dir, generator, flags, jobs, log, build_log)
        except EngineBuildError as exc:
            raise type(exc)(f"{exc}\n(full build log: {log_path})") from exc
    log(f"built llama-server {info['server_version']} ({describe_build(info)}) "
        f"in {info['build_seconds']} s")  # fmt: skip


def describe_build(info: dict[str, Any]) -> str:
    """``CPU`` or ``CUDA for architectures 90``, from a build's info (its cmake flags)."""
    flags = info.get("cmake_flags") or []
    if "-DGGML_CUDA=ON" not in flags:
        return "CPU"
    archs = next(
        (f.split("=", 1)[1] for f in flags if f.startswith("-DCMAKE_CUDA_ARCHITECTURES=")), "?"
    )
    return f"CUDA for architectures {archs}"


def _build_in(
    work: Path,
    version: str,
    target_dir: Path,
    generator: list[str],
    flags: list[str],
    jobs: int,
    log: Callable[[str], None],
    build_log: Any,
) -> dict[str, Any]:
    started = time.monotonic()
    info: dict[str, Any] = {"llama_cpp_python_version": version, "cmake_flags": flags}
    backend = "cuda" if "-DGGML_CUDA=ON" in flags else "cpu"
    described = describe_build(info)
    build_log.write(f"backend: {backend} ({described})\n")
    local = os.environ.get(SDIST_ENV)
    if local:
        sdist = _local_sdist(Path(local), version)
        log(f"using the llama-cpp-python {version} sources at {sdist} ({SDIST_ENV})")
    else:
        log(f"downloading llama-cpp-python {version} sources (sdist, ~75 MB)")
        sdist = _download_sdist(version, work / "download", build_log)
    log(f"extracting {sdist.name}")
    root = _safe_extract(sdist, work / "src")
    source = root / "vendor" / "llama.cpp"
    if not (source / "CMakeLists.txt").is_file():
        raise EngineBuildError(f"{sdist.name} has no vendor/llama.cpp/CMakeLists.txt")
    commit = _vendored_commit(source)
    build = work / "build"
    log(f"configuring llama.cpp {commit or '(unknown commit)'} for {described} with cmake")
    configure = ["cmake", "-S", str(source), "-B", str(build), *generator, *flags]
    _stream(configure, build_log, _discard, "cmake configure")
    log(f"compiling llama-server ({described}) with {jobs} job(s): a few minutes")
    compile_ = ["cmake", "--build", str(build), "--target", BINARY_NAME, "-j", str(jobs)]
    _stream(compile_, build_log, log, "cmake build")
    built = build / "bin" / BINARY_NAME
    if not _is_executable(built):
        raise EngineBuildError(f"the build finished but {built} is missing")
    try:
        server_version = llama_server_version(built)
    except LlamaCppError as exc:
        raise EngineBuildError(f"the built llama-server does not run: {exc}") from exc
    info.update({
        "backend": backend,
        "llama_cpp_commit": commit,
        "server_version": server_version,
        "native": True,  # GGML_NATIVE default: -march=native, see the module docstring
        "machine": platform.machine(),
        "sources": str(sdist) if local else "pypi",
        "build_seconds": round(time.monotonic() - started, 1),
        "built_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    })  # fmt: skip
    _atomic_write(target_dir / BUILD_INFO_NAME, json.dumps(info, indent=2).encode() + b"\n")
    staged = target_dir / f".{BINARY_NAME}.{os.getpid()}.tmp"
    shutil.copyfile(built, staged)
    staged.chmod(0o755)
    os.replace(staged, target_dir / BINARY_NAME)  # the binary appearing marks a finished build
    return info


def _local_sdist(path: Path, version: str) -> Path:
    """The sdist named by ``$KITT_LLAMA_SDIST`` (offline machines), checked to be the
    pinned version: building other sources under this version's cache would mislabel them."""
    if not path.is_file():
        raise SourceDownloadError(f"{SDIST_ENV}={path}: no such file")
    if not re.fullmatch(rf"llama_cpp_python-{re.escape(version)}\.tar(\.(gz|xz|bz2))?", path.name):
        raise SourceDownloadError(
            f"{SDIST_ENV}={path}: expected the llama-cpp-python {version} sdist "
            f"(llama_cpp_python-{version}.tar.gz)"
        )
    return path.absolute()


def _download_sdist(version: str, dest: Path, build_log: Any) -> Path:
    dest.mkdir(parents=True)
    argv = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--progress-bar",
        "off",
        "--disable-pip-version-check",
        f"llama-cpp-python=={version}",
        "-d",
        str(dest),
    ]
    try:
        _stream(argv, build_log, _discard, "pip download")
    except EngineBuildError as exc:
        text = str(exc)
        if "No module named pip" in text:
            raise SourceDownloadError(
                f"pip is not installed in {sys.executable}: install it "
                f"({sys.executable} -m ensurepip) to build llama-server"
            ) from exc
        raise SourceDownloadError(
            f"cannot download llama-cpp-python {version} from the package index "
            f"(network or registry unreachable?): {text}"
        ) from exc
    found = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise SourceDownloadError(f"pip download left no llama-cpp-python sdist in {dest}")
    return found[0]


def _safe_extract(archive: Path, dest: Path) -> Path:
    """Extract refusing members that escape ``dest`` (absolute paths, ``..``, odd links)."""
    dest.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:*") as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(dest, filter="data")
            else:  # Python 3.10 before 3.10.12: check each member ourselves
                members = [_checked_member(m, dest) for m in tar.getmembers()]
                tar.extractall(dest, members=members)  # noqa: S202 - members checked above
    except (tarfile.TarError, OSError) as exc:
        raise EngineBuildError(f"cannot extract {archive.name}: {exc}") from exc
    tops = [p for p in dest.iterdir() if p.is_dir()]
    if len(tops) != 1:
        raise EngineBuildError(f"{archive.name} does not hold exactly one top-level folder")
    return tops[0]


def _checked_member(member: tarfile.TarInfo, dest: Path) -> tarfile.TarInfo:
    base = dest.resolve()
    target = (base / member.name).resolve()
    if not target.is_relative_to(base) or os.path.isabs(member.name):
        raise tarfile.TarError(f"member {member.name!r} would be written outside {dest}")
    if member.issym() or member.islnk():
        link = (target.parent / member.linkname).resolve()
        if os.path.isabs(member.linkname) or not link.is_relative_to(base):
            raise tarfile.TarError(f"link {member.name!r} points outside {dest}")
    elif not (member.isfile() or member.isdir()):
        raise tarfile.TarError(f"member {member.name!r} is not a file or folder")
    return member


def _vendored_commit(source: Path) -> str | None:
    """The llama.cpp commit the sdist vendors, read from its git submodule metadata."""
    try:
        pointer = (source / ".git").read_text().strip()
        if not pointer.startswith("gitdir:"):
            return None
        head = (source / pointer.split(":", 1)[1].strip() / "HEAD").read_text().strip()
    except OSError:
        return None
    return head if re.fullmatch(r"[0-9a-f]{40}", head) else None


def _stream(argv: Sequence[str], build_log: Any, log: Callable[[str], None], what: str) -> None:
    """Run a build step, writing all its output to build.log and progress lines to ``log``."""
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    build_log.write(f"$ {' '.join(argv)}\n")
    env = dict(os.environ, CLICOLOR="0", CMAKE_COLOR_DIAGNOSTICS="OFF")
    try:
        proc = subprocess.Popen(
            list(argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
            env=env,
        )
    except OSError as exc:
        raise BuildToolMissingError(f"cannot run {argv[0]}: {exc}: {_INSTALL_HINT}") from exc
    with proc:
        for raw in proc.stdout or ():
            line = raw.rstrip()
            build_log.write(line + "\n")
            tail.append(line)
            if _PROGRESS.match(line):
                log(line)
    build_log.flush()
    if proc.returncode != 0:
        text = "\n".join(tail)
        if "CMAKE_CXX_COMPILER" in text or "CMAKE_C_COMPILER" in text:
            raise BuildToolMissingError(f"{what}: no working C/C++ compiler: {_INSTALL_HINT}")
        raise EngineBuildError(
            f"{what} failed ({_describe_exit(proc.returncode)}); last lines:\n{text}"
        )


def _describe_exit(code: int) -> str:
    return f"signal {-code}" if code < 0 else f"exit code {code}"


def _tail(lines: Sequence[str], n: int = _TAIL_LINES) -> str:
    return "\n".join(lines[-n:])


def _atomic_write(path: Path, data: bytes) -> None:
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    staged.write_bytes(data)
    os.replace(staged, path)
