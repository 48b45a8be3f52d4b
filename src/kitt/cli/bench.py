"""``kitt bench``: the serving benchmark on this machine, and the tools around it."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape

from kitt.bench.llamacpp import BACKEND_CHOICES
from kitt.bench.params import ServeParams, load_params
from kitt.cli.common import Duration, KittGroup, console
from kitt.errors import ConfigError

if TYPE_CHECKING:  # aiohttp and friends load only when a benchmark runs
    from kitt.bench import serve as serving_mod
    from kitt.bench.runner import Progress


@click.group("bench", cls=KittGroup)
def bench() -> None:
    """Benchmark an OpenAI-compatible inference engine from this machine."""


def _sigterm_as_interrupt(signum: int, frame: FrameType | None) -> None:
    """SIGTERM (a cancelled test, systemd) unwinds like Ctrl-C: the engine we started is
    stopped by its context manager on the way out."""
    raise KeyboardInterrupt


@bench.command("serve")
@click.option("--endpoint", help="Base URL of a running engine, e.g. http://127.0.0.1:8000.")
@click.option("--engine", help="Engine to start on a free local port (llama.cpp, vllm, …).")
@click.option("--model", help="Model name (--endpoint) or path/tag (--engine).")
@click.option("--served-model", help="Model name to put in requests (default: the engine's).")
@click.option("--api", type=click.Choice(["completions", "chat"]), help="API (completions).")
@click.option("--concurrency", help="Closed loop: comma-separated levels, e.g. 1,4,16.")
@click.option("--rate", help="Open loop: requests/s, comma-separated levels, e.g. 2,5,10.")
@click.option("--arrival", type=click.Choice(["poisson", "constant"]), help="Open-loop arrivals.")
@click.option("--max-concurrency", type=int, help="Open loop: cap requests in flight.")
@click.option("--sweep", is_flag=True, default=None,
              help="sync → max throughput → interpolated rates.")  # fmt: skip
@click.option("--sweep-steps", type=int, help="Interpolated rates in a sweep (5).")
@click.option("--sweep-max-concurrency", type=int, help="Concurrency of the max step (64).")
@click.option("--num-prompts", type=int, help="Measured requests per step (200).")
@click.option("--duration", "duration_s", type=Duration(), help="Measure each step this long.")
@click.option("--warmup", type=int, help="Warmup requests per step (default: one per slot).")
@click.option("--warmup-s", "warmup_s", type=Duration(), help="Warmup seconds per step.")
@click.option("--repeat", type=int, help="Run everything N times: mean, std, CV.")
@click.option("--input-len", type=int, help="Prompt tokens (128).")
@click.option("--input-len-std", type=float, help="Prompt tokens: std of a normal draw.")
@click.option("--input-len-min", type=int)
@click.option("--input-len-max", type=int)
@click.option("--output-len", type=int, help="Output tokens, forced with max_tokens (128).")
@click.option("--output-len-std", type=float)
@click.option("--output-len-min", type=int)
@click.option("--output-len-max", type=int)
@click.option("--dataset", type=click.Path(dir_okay=False), help="JSONL or ShareGPT file.")
@click.option("--output-len-from-file", is_flag=True, default=None,
              help="Dataset: keep each entry's own output length.")  # fmt: skip
@click.option("--seed", type=int, help="Seed for prompts and arrivals (0).")
@click.option("--no-calibrate", "calibrate", flag_value=False, default=None,
              help="Do not fit words to the engine's tokens.")  # fmt: skip
@click.option("--slo", help="Goodput objectives, e.g. ttft_ms=500,tpot_ms=50,e2e_ms=10000.")
@click.option("--ignore-eos/--no-ignore-eos", default=None,
              help="Send ignore_eos (default: when the engine accepts it).")  # fmt: skip
@click.option("--min-tokens/--no-min-tokens", default=None,
              help="Send min_tokens=output length (default: when accepted).")  # fmt: skip
@click.option("--timeout", "timeout_s", type=Duration(), help="Per-request timeout (600s).")
@click.option("--max-connections", type=int, help="Connection pool limit (0 = unlimited).")
@click.option("--telemetry-interval", "telemetry_interval_s", type=Duration(),
              help="GPU sampling interval (1s; >= 100ms).")  # fmt: skip
@click.option("--engine-args", help="Extra engine arguments, e.g. '--max-num-seqs 64' "
              "(engines with allow_args: true in agent.yaml).")  # fmt: skip
@click.option("--engine-timeout", "engine_timeout_s", type=Duration(),
              help="Wait this long for a started engine to be healthy.")  # fmt: skip
@click.option("--params-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Parameters as a JSON object (options given here win).")  # fmt: skip
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write the result JSON here (+ .requests.jsonl beside it).")  # fmt: skip
@click.option("--no-progress", is_flag=True, help="Plain progress lines, no bar.")
@click.option("--agent-config", type=click.Path(dir_okay=False, path_type=Path), hidden=True,
              help="Set by the agent: run under this agent.yaml's rules.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="Print the result document on stdout.")
def serve(params_file: Path | None, output: Path | None, no_progress: bool, as_json: bool,
          agent_config: Path | None, **options: Any) -> None:  # fmt: skip
    """Drive an OpenAI-compatible engine with streaming load and measure TTFT, TPOT, ITL,
    E2E latency, throughput and goodput (definitions: docs/metrics.md)."""
    from kitt.bench import report

    data: dict[str, Any] = {}
    if params_file is not None:
        data = _read_params_file(params_file)
    data.update({k: v for k, v in options.items() if v is not None})
    params = load_params(data)
    if agent_config is not None:
        params = _agent_rules(params, agent_config)
    out_console = Console(stderr=True, soft_wrap=True) if as_json else console
    if not out_console.is_terminal:
        out_console.width = max(out_console.width, 140)  # a log or a pipe: no squeezed table
    interactive = out_console.is_terminal and not no_progress
    progress = report.BarProgress(out_console) if interactive else report.LineProgress(out_console)
    previous = signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    try:
        outcome = _run(params, progress, output, out_console, agent_config)
    except KeyboardInterrupt:
        progress.close()
        out_console.print("interrupted: the run was stopped (any engine it started is stopped)")
        sys.exit(130)
    finally:
        progress.close()  # also on an error: the live display must not outlive the run
        signal.signal(signal.SIGTERM, previous)
    doc = outcome.document
    if as_json:
        click.echo(json.dumps(doc, indent=2))
        return
    out_console.print(report.summary_table(doc, out_console.width))
    repeats = report.repeats_table(doc)
    if repeats is not None:
        out_console.print(repeats)
    for warning in doc["warnings"]:
        out_console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    if outcome.files:
        names = ", ".join(str(p) for p in outcome.files.values())
        out_console.print(f"written: {escape(names)}")


def _agent_rules(params: ServeParams, agent_config: Path) -> ServeParams:
    """A run the agent started for the server: the agent's config must be there, and its
    rules hold again here (the agent checked them when it accepted the test)."""
    from kitt.agent.config import load_config
    from kitt.bench.params import agent_policy

    config = load_config(agent_config)  # missing or broken: a clear ConfigError
    return agent_policy(params, config.datasets_dir, config.allowed_endpoints)


def _run(
    params: ServeParams, progress: Progress, output: Path | None, out: Console,
    agent_config: Path | None,
) -> serving_mod.Outcome:  # fmt: skip
    from kitt.bench import serve as serving

    # An API key from this machine's environment goes only where its user pointed the
    # benchmark, never to an endpoint named over the network.
    key = serving.api_key_from_env() if agent_config is None else None
    dataset = serving.build_dataset(params)  # a bad file fails before any engine starts
    if params.engine is None:
        target = serving.endpoint_target(params)
        return serving.run(params, target, progress, output, api_key=key, dataset=dataset)

    def engine_line(line: str) -> None:
        # Plain writes: a chatty engine must not cost the load generator rich rendering.
        out.file.write(line + "\n")
        out.file.flush()

    out.print(f"starting engine {escape(params.engine)} with {escape(params.model)}")
    with serving.managed_target(params, engine_line, agent_config) as target:
        out.print(f"engine ready at {target.endpoint} (model {escape(target.model)})")
        return serving.run(params, target, progress, output, api_key=key, dataset=dataset)


def _read_params_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"params file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"params file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"params file {path}: expected a JSON object")
    return data


@bench.command("engines")
def engines_cmd() -> None:
    """List the engines this machine knows, and which it can start."""
    from rich.table import Table

    from kitt.bench import engines

    specs = engines.load_engines(engines.agent_settings().overrides)
    present = set(engines.available_engines(specs))
    table = Table()
    for col in ("engine", "available", "binary", "health"):
        table.add_column(col)
    for name, spec in sorted(specs.items()):
        table.add_row(name, "yes" if name in present else "no", str(spec.binary), spec.health_path)
    console.print(table)


@bench.command("prepare-demo")
@click.option("--backend", type=click.Choice(BACKEND_CHOICES),
              help="llama-server build: cuda, cpu, or auto (the default, or $KITT_LLAMA_BACKEND): "
              "cuda where nvcc and an NVIDIA GPU are found.")  # fmt: skip
def prepare_demo(backend: str | None) -> None:
    """Build llama.cpp's llama-server (once, cached) and write the demo's tiny model."""
    import os
    import shutil

    from kitt.bench import llamacpp, tiny_model

    def progress(line: str) -> None:
        console.print(f"  {escape(line)}", highlight=False)

    resolved = llamacpp.resolve_backend(backend)
    cached = llamacpp.cached_binary(backend=resolved)
    # A llama-server the user installed counts, as in `kitt demo`, unless a backend was asked for.
    asked = backend or os.environ.get(llamacpp.BACKEND_ENV)
    on_path = None if asked or cached.exists() else shutil.which(llamacpp.BINARY_NAME)
    if on_path:
        binary, what = Path(on_path), "found on PATH"
    else:
        if not cached.exists():
            console.print(f"building llama-server ({resolved}) into "
                          f"{escape(str(cached.parent))} …")  # fmt: skip
        binary = llamacpp.ensure_llama_server(log=progress, backend=resolved)
        info = llamacpp.read_build_info(backend=resolved) or {}
        what = llamacpp.describe_build(info)
    console.print(f"llama-server: {escape(str(binary))} "
                  f"({escape(llamacpp.llama_server_version(binary))}; {what})")  # fmt: skip
    model = tiny_model.ensure_demo_model()
    console.print(f"demo model: {escape(str(model))}")


@bench.command(
    "simulate",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.pass_context
def simulate(ctx: click.Context) -> None:
    """A fake OpenAI-compatible engine with injected TTFT and ITL, to check how faithfully
    this machine measures (options: kitt bench simulate --help)."""
    from kitt.bench.simulator import main as simulator_main

    sys.exit(simulator_main(ctx.args))
