"""Fixtures that run the real ``kitt`` command line as processes on 127.0.0.1.

Nothing KITT owns is mocked: each test gets its own KITT_HOME, free ports, a real
SQLite file, and talks to the daemons with real HTTP clients.

``KITT_TEST_DATABASE=postgresql`` runs the same tests on PostgreSQL: every sandbox then
gets its own database in a throwaway cluster (tests/pg.py), handed to every kitt process
it runs as ``KITT_DATABASE_URL``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from ports import free_port

__all__ = ["free_port"]  # re-exported: tests import it from here

FAKE_NVML_DIR = Path(__file__).parent / "fake_nvml"
GIB = 1024**3
H100 = "NVIDIA H100 80GB HBM3"


def two_h100s(util0: int = 35, util1: int = 85) -> list[dict[str, Any]]:
    """Two GPUs for the stand-in NVML (``Kitt.fake_gpus``), the second without power."""
    return [
        {"name": H100, "util": util0, "mem_total": 80 * GIB, "mem_used": 10 * GIB,
         "temp": 41, "power_mw": 120_500},
        {"name": H100, "util": util1, "mem_total": 80 * GIB, "mem_used": 30 * GIB,
         "temp": 67, "power_mw": None},  # power not supported on this board
    ]  # fmt: skip


BENCH_SCRIPTS = Path(__file__).parent / "bench_scripts"
TEST_DATABASE = os.environ.get("KITT_TEST_DATABASE", "sqlite")
ON_POSTGRES = TEST_DATABASE == "postgresql"
# What only SQLite has (its file, its backup and restore), skipped on PostgreSQL: whole
# test files, and tests (by name) that look into or delete the kitt.db file.
SQLITE_ONLY = {
    "test_backup.py": "backup/restore handle the SQLite file only",
    "test_server_daemon_status_and_second_start": "checks the mode of the kitt.db file",
    "test_enrollment_writes_a_private_key_and_a_ca_signed_cert": "greps the kitt.db file",
    "test_agent_registers_again_after_server_database_is_wiped": "deletes the kitt.db file",
    "test_wiped_database_with_auth_asks_for_enrollment_then_recovers": "deletes kitt.db",
    "test_bad_settings_are_refused_and_nothing_is_stored": "writes into the kitt.db file",
}
# Files whose tests never reach the server's database (the benchmark tool, engines, the
# agent's host-side pieces) or choose their database themselves (always PostgreSQL, or a
# benchmark's own): a PostgreSQL pass would run them exactly as the SQLite pass does.
SAME_ON_EVERY_DATABASE = {
    "test_bench_client.py", "test_bench_metrics.py", "test_bench_serve.py",
    "test_engines.py", "test_gpu_sampler.py", "test_llamacpp.py", "test_service.py",
    "test_simulator.py", "test_units.py", "test_fleet_sim.py",
    "test_postgres.py", "test_multi_instance.py",
}  # fmt: skip
T = TypeVar("T")


def wait_for(
    condition: Callable[[], T],
    timeout: float = 20.0,
    what: str = "condition",
    interval: float = 0.05,
) -> T:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = condition()
        except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}; last value: {last!r}")


@dataclass
class Kitt:
    """A sandbox: one KITT_HOME, and the environment every kitt process of the test gets."""

    home: Path
    env: dict[str, str] = field(default_factory=dict)
    server_port: int = 0
    agent_port: int = 0
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # The sandbox's PostgreSQL database (a PostgreSQL run only), dropped at the end.
    database: str | None = None

    @property
    def server_url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"

    @property
    def tls_url(self) -> str:
        return f"https://127.0.0.1:{self.server_port}"

    @property
    def agent_url(self) -> str:
        return f"http://127.0.0.1:{self.agent_port}"

    def run(
        self, *args: str, check: bool = False, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "kitt", *args],
            check=False,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
        if check and proc.returncode != 0:
            pytest.fail(
                f"kitt {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def popen(self, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kitt", *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        self.children.append(proc)
        return proc

    def start_server(self, *extra: str, interval: str = "0.5") -> None:
        self.run(
            "server", "start", "--port", str(self.server_port), "--heartbeat-interval", interval,
            *extra, check=True,
        )  # fmt: skip

    def init_agent(self, name: str = "gpu-01", *extra: str) -> None:
        self.run(
            "agent", "init", "--server", self.server_url, "--name", name,
            "--port", str(self.agent_port), "--bind", "127.0.0.1", *extra, check=True,
        )  # fmt: skip
        # Short retry cap so recovery tests do not wait a minute between attempts.
        cfg = self.home / "agent.yaml"
        cfg.write_text(cfg.read_text() + "backoff_max_s: 1\n")

    def add_benchmark(self, name: str, script: str, *args: str, **options: Any) -> None:
        """Declare a custom benchmark running one of tests/bench_scripts/ in agent.yaml."""
        cfg = self.home / "agent.yaml"
        data = yaml.safe_load(cfg.read_text())
        argv = [sys.executable, str(BENCH_SCRIPTS / script), *args]
        data.setdefault("benchmarks", {})[name] = {"command": argv, **options}
        cfg.write_text(yaml.safe_dump(data))

    def submit(self, benchmark: str, agent: str = "gpu-01", **params: Any) -> dict[str, Any]:
        response = self.api(
            "POST", "/api/v1/tests", json={"agent": agent, "benchmark": benchmark, "params": params}
        )
        assert response.status_code == 202, response.text
        return response.json()  # type: ignore[no-any-return]

    def test_info(self, test_id: str) -> dict[str, Any]:
        return self.api("GET", f"/api/v1/tests/{test_id}").json()  # type: ignore[no-any-return]

    def wait_status(self, test_id: str, *statuses: str, timeout: float = 30) -> dict[str, Any]:
        return wait_for(
            lambda: (t := self.test_info(test_id))["status"] in statuses and t,
            timeout=timeout,
            what=f"test {test_id} to become {'/'.join(statuses)}",
        )

    @property
    def admin_token(self) -> str:
        """The server's admin token ("" for a --no-auth server, which makes none)."""
        path = self.home / "server" / "admin-token"
        return path.read_text().strip() if path.exists() else ""

    def api(
        self,
        method: str,
        path: str,
        token: str | None = "admin",
        **kw: Any,
    ) -> httpx.Response:
        """A call to the server, as the admin unless ``token`` says otherwise (None: none)."""
        headers = dict(kw.pop("headers", None) or {})
        if token == "admin" and not self.admin_token:
            token = None
        if token is not None:
            headers.setdefault(
                "Authorization", f"Bearer {self.admin_token if token == 'admin' else token}"
            )
        ca = self.home / "server" / "certs" / "ca.pem"
        endpoint = self.home / "server" / "endpoint.json"
        if endpoint.exists() and json.loads(endpoint.read_text())["url"].startswith("https://"):
            return httpx.request(method, self.tls_url + path, timeout=10, headers=headers,
                                 verify=ssl.create_default_context(cafile=str(ca)), **kw)  # fmt: skip
        return httpx.request(method, self.server_url + path, timeout=10, headers=headers, **kw)

    def agent_config(self) -> dict[str, Any]:
        return yaml.safe_load((self.home / "agent.yaml").read_text())  # type: ignore[no-any-return]

    def as_server(self) -> dict[str, str]:
        """Headers the server presents when it calls the agent (the agent's push key)."""
        from kitt.tokens import push_key

        return {"Authorization": f"Bearer {push_key(self.agent_config()['token'])}"}

    def auth_for(self, url: str) -> dict[str, str]:
        """The credential a real caller of ``url`` presents: the server's push key toward
        the agent, the admin token toward the server."""
        if url.startswith(self.agent_url):
            return self.as_server()
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}

    def bootstrap_token(self, uses: int = 1, ttl: str = "1h") -> str:
        return self.run("server", "token", "create", "--quiet", "--uses", str(uses), "--ttl", ttl,
                        check=True).stdout.strip()  # fmt: skip

    def agents(self) -> list[dict[str, Any]]:
        body = self.api("GET", "/api/v1/agents").json()
        return body["agents"]  # type: ignore[no-any-return]

    def agent(self, name: str) -> dict[str, Any]:
        response = self.api("GET", f"/api/v1/agents/{name}")
        return response.json() if response.status_code == 200 else {}  # type: ignore[no-any-return]

    def heartbeats(self, name: str, limit: int = 1000) -> list[dict[str, Any]]:
        response = self.api("GET", f"/api/v1/agents/{name}/heartbeats", params={"limit": limit})
        return response.json()["heartbeats"] if response.status_code == 200 else []  # type: ignore[no-any-return]

    def agent_status(self) -> dict[str, Any]:
        return httpx.get(self.agent_url + "/api/status", timeout=5).json()  # type: ignore[no-any-return]

    def fake_gpus(self, gpus: list[dict[str, Any]] | None, **state: Any) -> Path:
        path = self.home.parent / "fake-nvml.json"
        body = {"gpus": gpus or [], **state} if gpus is not None else {"fail_init": "no library"}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(body))
        tmp.replace(path)
        self.env["KITT_FAKE_NVML"] = str(path)
        return path

    def pid_of(self, what: str) -> int | None:
        path = self.home / ("agent.pid" if what == "agent" else "server/server.pid")
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            return None

    def cleanup(self) -> None:
        for what in ("agent", "server"):
            pid = self.pid_of(what)
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in self.children:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


def pytest_configure(config: pytest.Config) -> None:
    if TEST_DATABASE not in ("sqlite", "postgresql"):
        raise pytest.UsageError(
            f"KITT_TEST_DATABASE={TEST_DATABASE!r}: use 'sqlite' (default) or 'postgresql'"
        )
    if ON_POSTGRES and not os.environ.get("KITT_REQUIRE_POSTGRES"):
        from pg import find_bindir

        if find_bindir() is None:  # a newcomer's machine: the SQLite pass is the one to run
            pytest.exit(
                "KITT_TEST_DATABASE=postgresql: PostgreSQL is not installed, so this pass "
                "runs nothing (apt-get install postgresql, or set KITT_PG_BINDIR)",
                returncode=0,
            )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not ON_POSTGRES:
        return
    for item in items:
        why = SQLITE_ONLY.get(item.path.name) or SQLITE_ONLY.get(
            getattr(item, "originalname", item.name)
        )
        if why:
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {why}"))
        elif item.path.name in SAME_ON_EVERY_DATABASE:
            item.add_marker(pytest.mark.skip(reason="the same on every database: run once"))


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """The session's throwaway PostgreSQL cluster (tests/pg.py). Skips where PostgreSQL
    is not installed, unless KITT_REQUIRE_POSTGRES is set or the run is on PostgreSQL."""
    from pg import find_bindir, start_cluster

    if find_bindir() is None:
        reason = (
            "PostgreSQL server binaries not found (apt-get install postgresql-15, or set "
            "KITT_PG_BINDIR to the folder holding initdb and pg_ctl)"
        )
        if os.environ.get("KITT_REQUIRE_POSTGRES") or ON_POSTGRES:
            pytest.fail(reason)
        pytest.skip(reason)
    yield from start_cluster()


@pytest.fixture
def kitt(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Kitt]:
    home = tmp_path / "kitt-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KITT_")}
    # The stand-in NVML goes first on the path; with no KITT_FAKE_NVML it behaves like a
    # GPU-less host, so the test never depends on whether this machine has a GPU.
    env["PYTHONPATH"] = os.pathsep.join(
        [str(FAKE_NVML_DIR), str(Path(__file__).parent.parent / "src"), env.get("PYTHONPATH", "")]
    )
    env["KITT_HOME"] = str(home)
    env["NO_COLOR"] = "1"
    env["COLUMNS"] = "200"
    sandbox = Kitt(home=home, env=env, server_port=free_port(), agent_port=free_port())
    cluster = request.getfixturevalue("postgres") if ON_POSTGRES else None
    if cluster is not None:
        sandbox.database = cluster.create_database()
        env["KITT_DATABASE_URL"] = cluster.url(sandbox.database)
    yield sandbox
    sandbox.cleanup()
    if cluster is not None and sandbox.database:
        cluster.drop_database(sandbox.database)


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The real llama-server (tests marked ``engine``): the cached build, else built here
    when ``KITT_BUILD_ENGINE=1`` (CI sets it), else the test is skipped."""
    from kitt.bench.llamacpp import cached_binary, ensure_llama_server

    binary = cached_binary()
    if binary.is_file() and os.access(binary, os.X_OK):
        return binary
    if os.environ.get("KITT_BUILD_ENGINE") == "1":
        return ensure_llama_server(log=lambda line: print(f"[llama.cpp build] {line}"))
    pytest.skip("llama-server not built: run `kitt bench prepare-demo` or set KITT_BUILD_ENGINE=1")


@pytest.fixture(scope="session")
def demo_model() -> Path:
    """The demo's tiny generated GGUF model (cached; written in well under a second)."""
    from kitt.bench.tiny_model import ensure_demo_model

    return ensure_demo_model()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """One headless Chromium for the whole run (each test gets its own context)."""
    from dashboard import launch_browser

    yield from launch_browser()


@pytest.fixture
def dashboard(kitt: Kitt, browser: Any, tmp_path: Path) -> Iterator[Any]:
    """A fresh browser context (no cookies) on the sandbox's server: start the server
    first (``kitt.start_server()``), then ``dashboard.login()``."""
    from dashboard import TIMEOUT_MS, Dashboard

    shots = Path(os.environ.get("KITT_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    context = browser.new_context(viewport={"width": 1440, "height": 900}, ignore_https_errors=True)
    context.set_default_timeout(TIMEOUT_MS)
    yield Dashboard(kitt, context.new_page(), shots)
    context.close()
