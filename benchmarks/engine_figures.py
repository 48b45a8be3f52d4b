"""llama-server figures with the demo model, run directly and through the fleet (issue 5).

Three figures:

1. ``kitt bench serve --engine llama.cpp`` run directly: output tok/s, TTFT p50/p99,
   TPOT p50 and ITL p50 per concurrency level, mean ± std across ``--repeat`` runs;
2. the same parameters as a ``serving`` test through a local server and agent (loopback,
   the way ``kitt demo`` runs them), compared step by step with the direct run using the
   noise rule of docs/results.md: a difference is real when
   ``|Δ| > 2·sqrt(std_a² + std_b²)``, std the across-repeat std in each document's
   ``repeats``.
   The direct result is also imported and ``kitt results compare`` asked for its
   verdicts, which must agree with ours;
3. the client's own fidelity per step and run (degraded?, loop and schedule lag p99,
   client CPU): on a 2-core machine the client, the engine, the agent and the server
   share the CPUs, so a degraded step's latencies include the client's own delay.

Both runs start llama-server with the same argv (the one ``kitt demo`` uses: one slot
per concurrent request, 1,024 tokens of context each, one thread): the direct run reads it
from an agent.yaml in its own temporary KITT_HOME, the agent from its agent.yaml. The
load average is printed at the start and end of each part: other work on the machine
moves these numbers more than the fleet does.

    python benchmarks/engine_figures.py [--repeat 3] [--num-prompts 200]
                                        [--concurrency 1,4,16] [--save DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml
from _harness import Sandbox, free_port, server_sandbox, wait_heartbeat

from kitt.protocol import TERMINAL_STATUSES

ENGINE = "llama.cpp"
AGENT = "engine-agent"
INPUT_LEN = 64
OUTPUT_LEN = 64
RUN_TIMEOUT_S = 540  # one benchmark run, direct or through the fleet

# (key in a step's metrics / in `repeats`, column label)
FIGURES: tuple[tuple[str, str], ...] = (
    ("output_token_throughput", "out tok/s"),
    ("ttft_ms.p50", "TTFT p50 ms"),
    ("ttft_ms.p99", "TTFT p99 ms"),
    ("tpot_ms.p50", "TPOT p50 ms"),
    ("itl_ms.p50", "ITL p50 ms"),
)
COMPARED: tuple[tuple[str, str], ...] = (
    *FIGURES,
    ("request_throughput", "req/s"),
    ("e2e_ms.p50", "E2E p50 ms"),
)


class Failure(Exception):
    """A step of the measurement failed; the message says which and what it printed."""


# --- processes ---------------------------------------------------------------------------


def kitt(env: dict[str, str], *args: str, timeout: float = 120) -> str:
    """Run ``kitt …`` as a user would; its stdout, or a Failure naming the command."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kitt", *args],
            env=env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise Failure(f"`kitt {' '.join(args)}` did not finish within {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise Failure(f"`kitt {' '.join(args)}` exited {proc.returncode}:\n{tail}")
    return proc.stdout


def engine_override(binary: Path, model: Path, slots: int) -> dict[str, Any]:
    """What both runs put in agent.yaml: kitt demo's llama-server argv, and the models folder."""
    from kitt.cli.demo import demo_engine_argv

    argv = demo_engine_argv(slots)
    return {
        "models_dir": str(model.parent),
        "engines": {ENGINE: {"binary": str(binary), "argv": argv}},
    }


def serve_params(args: argparse.Namespace) -> dict[str, str]:
    return {
        "concurrency": args.concurrency,
        "num_prompts": str(args.num_prompts),
        "input_len": str(INPUT_LEN),
        "output_len": str(OUTPUT_LEN),
        "repeat": str(args.repeat),
    }


def loadavg(label: str) -> None:
    one, five, fifteen = os.getloadavg()
    print(f"  load average {label}: {one:.2f} {five:.2f} {fifteen:.2f}  ({os.cpu_count()} CPUs)")


def run_direct(
    args: argparse.Namespace, override: dict[str, Any], model: Path, work: Path
) -> tuple[dict[str, Any], str]:
    """``kitt bench serve --engine`` in a KITT_HOME whose agent.yaml carries the override."""
    home = work / "direct-home"
    home.mkdir()
    # name and server_url are required keys of agent.yaml; nothing here talks to a server.
    config = {"name": "direct", "server_url": "http://127.0.0.1:9", **override}
    (home / "agent.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    out = work / "direct.json"
    cli = ["bench", "serve", "--engine", ENGINE, "--model", str(model)]
    for key, value in serve_params(args).items():
        cli += [f"--{key.replace('_', '-')}", value]
    cli += ["--no-progress", "-o", str(out)]
    print("  command: KITT_HOME=" + str(home) + " kitt " + " ".join(cli))
    output = kitt(dict(os.environ, KITT_HOME=str(home)), *cli, timeout=RUN_TIMEOUT_S)
    setup = engine_setup(output)
    print(f"  llama-server said: {setup}")
    return load_document(out), setup


def engine_setup(log: str) -> str:
    """Slots, context per slot and threads as llama-server itself reported them at start
    (the result document's ``engine.args`` holds only test-supplied extras, not the argv)."""
    found = [
        m.group(0) for m in re.finditer(r"n_slots = \d+, n_ctx_slot = \d+|n_threads = \d+", log)
    ]
    return ", ".join(dict.fromkeys(found)) or "(no setup lines found in its log)"


def load_document(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Failure(f"cannot read the result document {path}: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "kitt.serving":
        raise Failure(f"{path} is not a serving result document")
    return doc


def run_fleet(
    args: argparse.Namespace, override: dict[str, Any], model: Path, direct_path: Path
) -> tuple[dict[str, Any], str, dict[str, Any], str]:
    """Server and agent on loopback, the same parameters as a ``serving`` test. Returns the
    stored document, its id, ``kitt results compare``'s JSON against the direct run, and
    llama-server's own account of its setup."""
    with server_sandbox("--log-level", "warning") as box:
        agent_port = free_port()
        kitt(box.env, "agent", "init", "--server", box.url, "--name", AGENT,
             "--bind", "127.0.0.1", "--port", str(agent_port))  # fmt: skip
        config_path = box.home / "agent.yaml"
        config = yaml.safe_load(config_path.read_text())
        config.update(override)
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        try:
            kitt(box.env, "agent", "start")
            wait_heartbeat(box, AGENT, agent_port, timeout=60)
            wait_capability(box, f"engine:{ENGINE}")
            cli = ["test", "run", "--agent", AGENT, "--benchmark", "serving",
                   "--engine", ENGINE, "--model", model.name]  # fmt: skip
            for key, value in serve_params(args).items():
                cli += ["--param", f"{key}={value}"]
            print("  command: kitt " + " ".join(cli) + " --follow --json")
            daemons = {"agent": psutil.Process(int((box.home / "agent.pid").read_text())),
                       "server": psutil.Process(box.server_pid())}  # fmt: skip
            cpu_before = {k: sum(p.cpu_times()[:2]) for k, p in daemons.items()}
            t0 = time.monotonic()
            try:
                proc = subprocess.run(
                    [sys.executable, "-m", "kitt", *cli, "--follow", "--json"],
                    env=box.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
                    check=False,
                )  # fmt: skip
            except subprocess.TimeoutExpired:
                raise Failure(f"the serving test did not end within {RUN_TIMEOUT_S} s") from None
            try:
                test = json.loads(proc.stdout)
            except ValueError:
                raise Failure(f"`kitt test run` printed no test (exit {proc.returncode}): "
                              f"{(proc.stderr or proc.stdout).strip()[-2000:]}") from None  # fmt: skip
            test = wait_terminal(box, test)
            wall = time.monotonic() - t0
            for name, proc_ in daemons.items():
                used = sum(proc_.cpu_times()[:2]) - cpu_before[name]
                print(f"  {name} process: {used:.1f} s CPU during the test "
                      f"({used / wall:.0%} of one core over {wall:.0f} s)")  # fmt: skip
            log = kitt(box.env, "test", "logs", test["id"])
            engine_lines = sum(line.startswith("[llama.cpp]") for line in log.splitlines())
            print(f"  test log: {len(log.splitlines())} lines ({engine_lines} from llama-server) "
                  "carried agent -> server")  # fmt: skip
            setup = engine_setup(log)
            print(f"  llama-server said: {setup}")
            if test["status"] != "completed":
                raise Failure(f"the serving test ended {test['status']}: {test.get('error')}\n"
                              + "\n".join(log.splitlines()[-20:]))  # fmt: skip
            stored = json.loads(kitt(box.env, "results", "show", test["id"], "--json"))
            document = stored["document"]
            imported = kitt(box.env, "results", "import", str(direct_path))
            match = re.search(r"(?:imported as|already stored as) (\S+)", imported)
            if match is None:
                raise Failure(f"`kitt results import` said: {imported.strip()}")
            compared = json.loads(
                kitt(box.env, "results", "compare", match.group(1), test["id"], "--json")
            )
            return document, test["id"], compared, setup
        finally:
            subprocess.run(
                [sys.executable, "-m", "kitt", "agent", "stop"], env=box.env,
                capture_output=True, check=False, timeout=60,
            )  # fmt: skip


def wait_capability(box: Sandbox, capability: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    with box.user_client() as client:
        while time.monotonic() < deadline:
            r = client.get(f"/api/v1/agents/{AGENT}")
            if r.status_code == 200 and capability in r.json().get("capabilities", []):
                return
            time.sleep(0.2)
    raise Failure(f"the agent did not advertise {capability} within {timeout:.0f} s "
                  f"(its log: {box.home / 'agent.log'})")  # fmt: skip


def wait_terminal(box: Sandbox, test: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    """The log stream can end a moment before the test's final state is stored."""
    deadline = time.monotonic() + timeout
    with box.user_client() as client:
        while test["status"] not in TERMINAL_STATUSES:
            if time.monotonic() > deadline:
                raise Failure(f"test {test['id']} still {test['status']} after its log ended")
            time.sleep(0.2)
            r = client.get(f"/api/v1/tests/{test['id']}")
            r.raise_for_status()
            test = r.json()
    return test


# --- figures -----------------------------------------------------------------------------


def lookup(metrics: dict[str, Any], dotted: str) -> float | None:
    node: Any = metrics
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return float(node) if isinstance(node, (int, float)) else None


def step_names(doc: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for step in doc["steps"]:
        if step["name"] not in names:
            names.append(step["name"])
    return names


def stat(doc: dict[str, Any], step: str, key: str) -> tuple[float | None, float | None]:
    """(mean, sample std) across repeats from the document's ``repeats``; a single run:
    (its value, None)."""
    for entry in doc.get("repeats") or []:
        if entry["name"] == step and key in entry["metrics"]:
            m = entry["metrics"][key]
            return m["mean"], m["std"]
    runs = [lookup(s["metrics"], key) for s in doc["steps"] if s["name"] == step]
    return (runs[0] if runs else None), None


def pm(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    digits = 0 if abs(mean) >= 100 else 1 if abs(mean) >= 10 else 2
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))  # fmt: skip


def check_document(doc: dict[str, Any], args: argparse.Namespace, label: str) -> list[str]:
    """What makes the figures untrustworthy: errors, missing steps, short outputs."""
    problems = []
    levels = [f"c={c.strip()}" for c in args.concurrency.split(",")]
    if step_names(doc) != levels:
        problems.append(f"{label}: steps {step_names(doc)}, expected {levels}")
    for step in doc["steps"]:
        m, where = step["metrics"], f"{label} {step['name']} run {step['repeat_index'] + 1}"
        if m["errors"]:
            problems.append(f"{where}: {m['errors']} errors of {m['requests']} requests")
        if m["output_tokens"] != m["completed"] * OUTPUT_LEN:
            problems.append(f"{where}: {m['output_tokens']} output tokens, expected "
                            f"{m['completed']} x {OUTPUT_LEN}")  # fmt: skip
    return problems


def print_figures(doc: dict[str, Any]) -> None:
    header = ["step", *(label for _, label in FIGURES), "in tok/req"]
    rows = []
    for name in step_names(doc):
        runs = [s["metrics"] for s in doc["steps"] if s["name"] == name]
        input_per_req = sum(m["input_tokens"] for m in runs) / max(
            1, sum(m["completed"] for m in runs)
        )
        rows.append(
            [name, *(pm(*stat(doc, name, key)) for key, _ in FIGURES), f"{input_per_req:.1f}"]
        )
    table(header, rows)
    engine = doc["engine"]
    print(f"  engine as the document records it: {engine['name']} {engine.get('version')}")


def print_comparison(
    direct: dict[str, Any], fleet: dict[str, Any], compared: dict[str, Any]
) -> list[str]:
    """Our table of Δ per step and metric, with the noise verdict; returns disagreements
    with ``kitt results compare``."""
    theirs = {(r["scope"], r["metric"]): r for r in compared["rows"]}
    header = ["step", "metric", "direct", "fleet", "Δ", "Δ %", "noise 2*std", "verdict"]
    rows, disagree, exceed = [], [], 0
    for name in step_names(direct):
        for key, label in COMPARED:
            (a, sa), (b, sb) = stat(direct, name, key), stat(fleet, name, key)
            if a is None or b is None:
                continue
            delta = b - a
            pct = f"{delta / abs(a) * 100:+.1f}%" if a else "-"
            if sa is None or sb is None:
                threshold, verdict = None, "noise unknown"
            else:
                threshold = 2 * math.sqrt(sa**2 + sb**2)
                beyond = abs(delta) > threshold
                exceed += beyond
                verdict = "EXCEEDS noise" if beyond else "within noise"
                row = theirs.get((name, key))
                if row is not None and row["exceeds_noise"][1] is not beyond:
                    disagree.append(f"{name} {key}: ours {beyond}, "
                                    f"kitt results compare {row['exceeds_noise'][1]}")  # fmt: skip
            rows.append([name, label, pm(a, sa), pm(b, sb), pm(delta, None), pct,
                         pm(threshold, None), verdict])  # fmt: skip
    table(header, rows)
    print(f"  {exceed} of {len(rows)} differences exceed run-to-run noise "
          f"(rule: |Δ| > 2·sqrt(std_a² + std_b²))")  # fmt: skip
    return disagree


def print_fidelity(doc: dict[str, Any], label: str) -> None:
    header = [
        "run",
        "step",
        "degraded",
        "loop lag p99 ms",
        "sched lag p99 ms",
        "client cpu",
        "reasons",
    ]
    rows = []
    for step in doc["steps"]:
        c = step["metrics"].get("client") or {}
        rows.append([
            label, f"{step['name']} #{step['repeat_index'] + 1}", "yes" if c.get("degraded") else "no",
            pm(lookup(c, "loop_lag_ms.p99"), None), pm(lookup(c, "schedule_lag_ms.p99"), None),
            f"{c['cpu_fraction']:.0%}" if isinstance(c.get("cpu_fraction"), (int, float)) else "-",
            "; ".join(c.get("reasons") or []),
        ])  # fmt: skip
    table(header, rows)


# --- main --------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of every step (>= 2 for noise)")
    parser.add_argument("--num-prompts", type=int, default=200, help="measured requests per step")
    parser.add_argument("--concurrency", default="1,4,16", help="closed-loop levels")
    parser.add_argument("--save", type=Path, help="keep both result documents in this folder")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.num_prompts < 1:
        parser.error("--repeat and --num-prompts must be at least 1")
    try:
        levels = [int(c) for c in args.concurrency.split(",")]
    except ValueError:
        parser.error(f"--concurrency: expected numbers like 1,4,16, got {args.concurrency!r}")
    if not levels or min(levels) < 1:
        parser.error("--concurrency: levels must be at least 1")
    args.slots = max(levels)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kitt.bench import llamacpp, tiny_model

    binary = llamacpp.find_llama_server()
    if binary is None:
        raise Failure("llama-server is not built: run `kitt bench prepare-demo` first")
    model = tiny_model.ensure_demo_model()
    override = engine_override(binary, model, args.slots)
    argv = override["engines"][ENGINE]["argv"]
    print("llama-server argv (agent.yaml of both runs): " + " ".join(argv))
    print(f"llama-server {binary}\nmodel {model}\nrepeat {args.repeat}, {args.num_prompts} "
          f"prompts per step, concurrency {args.concurrency}, input/output {INPUT_LEN}/{OUTPUT_LEN} tokens")  # fmt: skip
    if args.repeat < 2:
        print("note: with --repeat 1 run-to-run noise is unknown; the comparison gives no verdict")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="kitt-engine-figures-") as tmp:
        work = Path(tmp)
        print("\n== 1. kitt bench serve, run directly ==")
        loadavg("at start")
        t0 = time.monotonic()
        direct, direct_setup = run_direct(args, override, model, work)
        print(f"  took {time.monotonic() - t0:.0f} s")
        loadavg("at end")
        print_figures(direct)

        print("\n== 2. the same as a `serving` test through a local server and agent ==")
        loadavg("at start")
        t0 = time.monotonic()
        fleet, test_id, compared, fleet_setup = run_fleet(
            args, override, model, work / "direct.json"
        )
        print(
            f"  test {test_id} took {time.monotonic() - t0:.0f} s (server and agent start included)"
        )
        loadavg("at end")
        print_figures(fleet)
        print("\n  fleet - direct, per step (mean across repeats):")
        disagree = print_comparison(direct, fleet, compared)

        print("\n== 3. client fidelity per step and run ==")
        print_fidelity(direct, "direct")
        print_fidelity(fleet, "fleet")
        warnings = sorted({w for d in (direct, fleet) for w in d.get("warnings", [])
                           if "client fidelity" not in w})  # fmt: skip
        for warning in warnings:
            print(f"  warning (from the documents): {warning}")

        if args.save is not None:
            args.save.mkdir(parents=True, exist_ok=True)
            shutil.copy(work / "direct.json", args.save / "direct.json")
            (args.save / "fleet.json").write_text(json.dumps(fleet, indent=2))
            print(f"\nresult documents saved in {args.save}")
    print(f"\ntotal {time.monotonic() - started:.0f} s")
    problems = check_document(direct, args, "direct") + check_document(fleet, args, "fleet")
    problems += [f"noise verdict differs: {d}" for d in disagree]
    if direct_setup != fleet_setup:
        problems.append(f"llama-server ran differently: direct {direct_setup}, fleet {fleet_setup}")
    if problems:
        print(
            "error: the figures above are not trustworthy:\n  " + "\n  ".join(problems),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Failure as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)
    except subprocess.CalledProcessError as exc:  # the harness's server start
        detail = (exc.stderr or exc.stdout or "").strip()
        print(f"error: `{' '.join(map(str, exc.cmd[2:]))}` exited {exc.returncode}: {detail}",
              file=sys.stderr)  # fmt: skip
        sys.exit(1)
    except httpx.HTTPError as exc:
        print(f"error: talking to the local server: {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted: everything started was stopped", file=sys.stderr)
        sys.exit(130)
