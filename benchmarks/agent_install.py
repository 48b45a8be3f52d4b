"""How long adding a GPU machine takes: package build, one-line install, update.

Starts a TLS server with a wheelhouse (``kitt server wheelhouse``, so nothing comes from
PyPI), then times on a temp HOME: the install line ``kitt agents add`` prints, until the
agent is registered; a re-run of the same line (same version: identity kept, daemon
restarted); and ``kitt-agent update --restart`` with nothing newer (the no-op check).

    .venv/bin/python benchmarks/agent_install.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import free_port, server_sandbox

from kitt.server.package import build_wheel

SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


def timed(argv: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{argv[:3]} failed:\n{proc.stdout}\n{proc.stderr}")
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        builds = []
        for i in range(5):
            start = time.perf_counter()
            pkg = build_wheel(Path(tmp) / f"b{i}")
            builds.append(time.perf_counter() - start)
        print(f"agent wheel build at server start: {min(builds) * 1000:.0f} ms "
              f"(best of 5), {pkg.size / 1e3:.0f} kB, {pkg.filename}")  # fmt: skip
        data = Path(tmp) / "wh"
        env = {k: v for k, v in os.environ.items() if not k.startswith("KITT_")}
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "kitt", "server", "wheelhouse", "--data-dir",
                        str(data)], env=env, check=True, capture_output=True)  # fmt: skip
        wheels = list((data / "wheelhouse").iterdir())
        print(f"kitt server wheelhouse: {time.perf_counter() - start:.1f} s, {len(wheels)} "
              f"wheels, {sum(p.stat().st_size for p in wheels) / 1e6:.1f} MB")  # fmt: skip
        with server_sandbox("--tls", "--wheelhouse", str(data / "wheelhouse")) as box:
            home = Path(tmp) / "gpu"
            home.mkdir()
            shutil.copy(box.home / "server" / "certs" / "ca.pem", home / "ca.pem")
            port = free_port()
            add = box.kitt("agents", "add", "--name", "bench-gpu", "--port", str(port), "--json")
            line = json.loads(add.stdout)["cacert"] + " --bind 127.0.0.1"
            gpu_env = {"HOME": str(home), "PATH": SYSTEM_PATH, "LANG": "C.UTF-8"}
            first = timed(["bash", "-c", line], gpu_env, home)
            print(f"one-line install, fresh venv from the server, until registered: {first:.1f} s")
            again = timed(["bash", "-c", line], gpu_env, home)
            print(f"re-run (same version: venv reused, identity kept, restart): {again:.1f} s")
            agent = str(home / ".kitt" / "agent-venv" / "bin" / "kitt-agent")
            noop = timed([agent, "update", "--restart"], gpu_env, home)
            print(f"kitt-agent update --restart with nothing newer: {noop:.2f} s")
            subprocess.run([agent, "stop"], env=gpu_env, capture_output=True, check=False)


if __name__ == "__main__":
    main()
