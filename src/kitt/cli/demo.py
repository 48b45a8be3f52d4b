"""``kitt demo``: the whole product on one machine, on its embedded defaults.

A local server (SQLite) and a local agent in their own KITT_HOME, a real engine
(llama.cpp's ``llama-server``, built from source once and cached) serving a small
generated model, a ``serving`` test with a concurrency sweep dispatched through the
server, its log followed live, and the results table at the end. Everything it started
is stopped on the way out, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Any

import click
from rich.markup import escape

from kitt.cli.common import console
from kitt.errors import KittError

DEMO_AGENT = "demo-agent"
ENGINE = "llama.cpp"
ENGINE_PREFIX = f"[{ENGINE}]"
TABLE_CHARS = frozenset("┏┃┡│└╇━┗ ")


class DemoError(KittError):
    """A step of the demo failed; the message says which and how to look closer."""


def _kitt(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a ``kitt`` command as the user would (same interpreter, demo's KITT_HOME)."""
    proc = subprocess.run(
        [sys.executable, "-m", "kitt", *args], capture_output=True, text=True, check=False
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise DemoError(
            f"`kitt {' '.join(args)}` failed: {detail[-1] if detail else proc.returncode}"
        )
    return proc


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _prepare_engine(slots: int) -> tuple[Path, Path, list[str]]:
    """The cached llama-server (built on first use) and the demo model."""
    from kitt.bench import llamacpp, tiny_model

    binary = llamacpp.find_llama_server()
    if binary is None:
        console.print(
            "building llama.cpp's llama-server from source (first run only; about 5 minutes on "
            f"2 cores; cached in {escape(str(llamacpp.cache_dir()))})"
        )
        last = [0.0]

        def progress(line: str) -> None:
            now = time.monotonic()
            if now - last[0] >= 5 or "error" in line.lower():
                last[0] = now
                console.print(f"  [dim]{escape(line[:160])}[/dim]", highlight=False)

        binary = llamacpp.ensure_llama_server(log=progress)
    model = tiny_model.ensure_demo_model()
    return binary, model, demo_engine_argv(slots)


def demo_engine_argv(slots: int) -> list[str]:
    """llama-server as the demo runs it: one slot per concurrent request, 1,024 tokens of
    context for each slot's prompt and output, one thread (a small, busy box)."""
    return ["{binary}", "-m", "{model}", "--host", "{host}", "--port", "{port}",
            "--alias", "{model_name}", "--metrics", "-np", str(slots),
            "-c", str(slots * 1024), "-t", "1"]  # fmt: skip


@click.command("demo")
@click.option("--home", type=click.Path(file_okay=False, path_type=Path),
              help="KITT_HOME for the demo (default: a new temporary folder).")  # fmt: skip
@click.option("--endpoint", help="Benchmark this running engine instead (e.g. Ollama's URL).")
@click.option("--model", help="Model name at --endpoint.")
@click.option("--concurrency", default="1,4,16", show_default=True, help="Levels to sweep.")
@click.option("--num-prompts", type=int, default=48, show_default=True)
@click.option("--input-len", type=int, default=64, show_default=True)
@click.option("--output-len", type=int, default=64, show_default=True)
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also save the result document here.")  # fmt: skip
@click.option("--keep", is_flag=True, help="Leave the server and agent running afterwards.")
def demo(
    home: Path | None, endpoint: str | None, model: str | None, concurrency: str,
    num_prompts: int, input_len: int, output_len: int, output: Path | None, keep: bool,
) -> None:  # fmt: skip
    """Run KITT end to end on this machine: server, agent, a real engine, a benchmark."""
    if (endpoint is None) != (model is None):
        raise click.UsageError("--endpoint and --model go together")
    if not console.is_terminal:
        console.width = max(console.width, 140)  # a log or a pipe: no squeezed table
    temporary = home is None
    home = (home or Path(tempfile.mkdtemp(prefix="kitt-demo-"))).absolute()
    os.environ["KITT_HOME"] = str(home)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    console.print(f"KITT demo in {escape(str(home))}")
    try:
        params: dict[str, Any] = {"concurrency": concurrency, "num_prompts": num_prompts,
                                  "input_len": input_len, "output_len": output_len}  # fmt: skip
        engine_cfg: dict[str, Any] | None = None
        if endpoint is None:
            slots = max(int(c) for c in concurrency.split(",") if c.strip())
            binary, model_path, argv = _prepare_engine(slots)
            engine_cfg = {"binary": str(binary), "argv": argv, "model": model_path}
        else:
            params["endpoint"] = endpoint
        _run(home, engine_cfg, model, params, output, keep)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: stopping what the demo started")
        _stop_all(keep=False)
        sys.exit(130)
    except BaseException:
        _stop_all(keep=False)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    _stop_all(keep)
    if keep:
        console.print(
            f"\nserver and agent still running. Open the dashboard at {_dashboard_url()} "
            f"(admin token: {home / 'server' / 'admin-token'}), or explore with "
            f"[bold]export KITT_HOME={home}[/bold], then: kitt agents list · kitt results "
            "list · kitt results show ID · kitt test list · kitt server stop && kitt agent stop"
        )
    elif temporary:
        shutil.rmtree(home, ignore_errors=True)
        console.print("stopped the server and the agent; removed the demo's KITT_HOME "
                      "(--keep leaves them running to explore)")  # fmt: skip
    else:
        console.print(f"stopped the server and the agent; their data stays in {escape(str(home))}")


def _dashboard_url() -> str:
    from kitt.fleet_client import resolve_server_url

    return resolve_server_url(None) + "/"


def _stop_all(keep: bool) -> None:
    if keep:
        return
    _kitt("agent", "stop", check=False)
    _kitt("server", "stop", check=False)


def _run(
    home: Path, engine_cfg: dict[str, Any] | None, model: str | None, params: dict[str, Any],
    output: Path | None, keep: bool,
) -> None:  # fmt: skip
    import json

    from kitt.agent.config import update_config
    from kitt.bench import report
    from kitt.bench.engines import free_port
    from kitt.fleet_client import connect, resolve_server_url
    from kitt.paths import AgentPaths
    from kitt.protocol import SERVING_BENCHMARK, TERMINAL_STATUSES, TestRequest

    console.print("starting the server (SQLite, loopback) …")
    _kitt("server", "start", "--port", "0")
    server_url = resolve_server_url(None)
    console.print(
        f"dashboard: {server_url}/ (admin token in {home / 'server' / 'admin-token'}; "
        "--keep leaves it running after the demo)",
        highlight=False,
    )
    with connect(None) as fleet:
        console.print(f"starting the agent {DEMO_AGENT} …")
        _kitt("agent", "init", "--server", server_url, "--name", DEMO_AGENT,
              "--bind", "127.0.0.1", "--port", str(free_port()))  # fmt: skip
        config = AgentPaths(home).config
        if engine_cfg is not None:
            model_path = Path(engine_cfg["model"])
            update_config(config, {
                "models_dir": str(model_path.parent),
                "engines": {ENGINE: {"binary": engine_cfg["binary"], "argv": engine_cfg["argv"]}},
            })  # fmt: skip
        _kitt("agent", "start")
        _wait_online(fleet, DEMO_AGENT)
        request = TestRequest(
            agent=DEMO_AGENT, benchmark=SERVING_BENCHMARK,
            engine=ENGINE if engine_cfg is not None else None,
            model=Path(engine_cfg["model"]).name if engine_cfg is not None else model,
            params=params,
        )  # fmt: skip
        test = fleet.submit(request)
        console.print(f"test {test.id} dispatched: serving benchmark, concurrency "
                      f"{params['concurrency']} — its log, live from the agent:")  # fmt: skip
        hidden = 0
        try:
            for name, data in fleet.log_events(test.id):
                if name != "log":
                    continue
                line = data["line"]
                # The engine's own chatter and the benchmark's table (printed again below,
                # from the stored result) stay in the test log: `kitt test logs ID`.
                if line.startswith(ENGINE_PREFIX) or line[:1] in TABLE_CHARS:
                    hidden += 1
                    continue
                console.out("  " + line, highlight=False)
        except KeyboardInterrupt:
            with contextlib.suppress(KittError):
                fleet.cancel(test.id)
            raise
        if hidden:
            console.print(f"  [dim]({hidden} engine and table lines not shown: "
                          f"kitt test logs {test.id})[/dim]")  # fmt: skip
        deadline = time.monotonic() + 30
        test = fleet.test(test.id)
        while test.status not in TERMINAL_STATUSES and time.monotonic() < deadline:
            time.sleep(0.2)
            test = fleet.test(test.id)
        if test.status != "completed" or test.result is None:
            raise DemoError(
                f"the test ended {test.status}: {test.error or 'no result'} "
                f"(its log: kitt test logs {test.id}, with KITT_HOME={home})"
            )
        doc = test.result
        console.print(report.summary_table(doc, console.width))
        for warning in doc.get("warnings", []):
            console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
        if output is not None:
            output.write_text(json.dumps(doc, indent=2))
            console.print(f"result written to {escape(str(output))}")
        console.print(
            f"stored on the server as result {test.id}: kitt results show {test.id} · "
            f"kitt results compare {test.id} OTHER · kitt results export --format csv"
            + ("" if keep else f"  (with --keep and KITT_HOME={home})")
        )


def _wait_online(fleet: Any, name: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for agent in fleet.agents():
            if agent.name == name and agent.online:
                return
        time.sleep(0.2)
    raise DemoError(f"the agent {name} did not come online within {timeout:g} s "
                    "(its log: $KITT_HOME/agent.log)")  # fmt: skip
