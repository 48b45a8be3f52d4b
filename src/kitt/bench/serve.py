"""One serving benchmark, end to end: engine (started or given), GPU sampler, the steps,
the result document and its files.

Shared by ``kitt bench serve`` and the agent's built-in ``serving`` benchmark (which runs
``kitt bench serve --params-file …`` as its supervised subprocess), so a run through the
fleet and a run on the command line are the same code and give the same numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from kitt.bench.client import StreamingClient, base_url
from kitt.bench.datasets import FileDataset, LengthDist, Synthetic
from kitt.bench.gpu import GpuSampler
from kitt.bench.params import ServeParams
from kitt.bench.records import RequestRecord
from kitt.bench.result import document, hardware, now_iso, sidecar, write, write_json
from kitt.bench.runner import Progress, Runner, StepResult
from kitt.errors import KittError

# What engines are known to accept to force an exact output length, by the name their
# /v1/models "owned_by" gives (used when benchmarking an endpoint KITT did not start).
OWNED_BY_ENGINE = {"vllm": "vllm", "llamacpp": "llama.cpp", "sglang": "sglang",
                   "library": "ollama", "ollama": "ollama"}  # fmt: skip


class BenchError(KittError):
    """The benchmark could not run (endpoint unreachable, no request succeeded, …)."""


@dataclass
class Target:
    """Where requests go, and what the result should say about the engine."""

    endpoint: str
    model: str
    engine: dict[str, Any]
    ignore_eos: bool
    min_tokens: bool


@dataclass
class Outcome:
    document: dict[str, Any]
    records: list[RequestRecord]
    origin: float
    files: dict[str, Path]


def build_dataset(p: ServeParams) -> Synthetic | FileDataset:
    out_len = LengthDist(p.output_len, p.output_len_std, p.output_len_min, p.output_len_max)
    if p.dataset:
        return FileDataset(Path(p.dataset), None if p.output_len_from_file else out_len, p.seed)
    in_len = LengthDist(p.input_len, p.input_len_std, p.input_len_min, p.input_len_max)
    return Synthetic(in_len, out_len, p.seed)


async def _models(endpoint: str) -> list[dict[str, Any]]:
    url = base_url(endpoint) + "/v1/models"
    try:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as s, s.get(url) as resp:
            if resp.status != 200:
                return []
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise BenchError(f"cannot reach the engine at {base_url(endpoint)}: {exc}") from None
    items = data.get("data") if isinstance(data, dict) else None
    return [m for m in items or [] if isinstance(m, dict)]


def endpoint_target(p: ServeParams) -> Target:
    """An engine someone else runs: ask it what it is (``/v1/models``)."""
    assert p.endpoint is not None  # noqa: S101 - validated by ServeParams
    models = asyncio.run(_models(p.endpoint))
    owned = {str(m.get("owned_by", "")).lower() for m in models}
    name = next((OWNED_BY_ENGINE[o] for o in owned if o in OWNED_BY_ENGINE), None)
    ignore_eos = p.ignore_eos if p.ignore_eos is not None else name in ("vllm", "sglang",
                                                                         "llama.cpp")  # fmt: skip
    min_tokens = p.min_tokens if p.min_tokens is not None else name in ("vllm", "sglang")
    engine = {"name": name, "version": None, "args": None, "managed": False,
              "endpoint": base_url(p.endpoint),
              "served_models": [m.get("id") for m in models][:20]}  # fmt: skip
    return Target(base_url(p.endpoint), p.served_model or p.model, engine, ignore_eos, min_tokens)


@contextlib.contextmanager
def managed_target(
    p: ServeParams, on_line: Callable[[str], None], agent_config: Path | None = None
) -> Iterator[Target]:
    """Start the named engine on a free local port, yield its target, always stop it.
    ``agent_config``: the agent's own config, for a run the agent started."""
    from kitt.bench import engines

    settings = engines.agent_settings(agent_config)
    specs = engines.load_engines(settings.overrides)
    assert p.engine is not None  # noqa: S101 - validated by ServeParams
    spec = engines.get_engine(specs, p.engine)
    model_path = engines.resolve_model(
        spec, p.model, settings.models_dir, allow_any_path=settings.allow_any_model_path
    )
    with engines.EngineProcess(spec, model_path, on_line=on_line, engine_args=p.engine_argv,
                               startup_timeout_s=p.engine_timeout_s) as proc:  # fmt: skip
        # The name the engine was told to serve (--alias / --served-model-name); for Ollama,
        # whose model list holds every pulled model, the tag asked for.
        served = p.served_model or proc.model_name
        info = proc.describe()
        ignore_eos = p.ignore_eos if p.ignore_eos is not None else spec.ignore_eos
        min_tokens = p.min_tokens if p.min_tokens is not None else spec.min_tokens
        yield Target(proc.url, served, info, ignore_eos, min_tokens)


def _sampler(interval_s: float) -> GpuSampler:
    # perf_counter: the clock every request instant is stamped with, so step windows line
    # up with GPU samples exactly.
    return GpuSampler(interval_s, clock=time.perf_counter)


def run(
    p: ServeParams,
    target: Target,
    progress: Progress,
    output: Path | None,
    *,
    api_key: str | None = None,
    dataset: Synthetic | FileDataset | None = None,
) -> Outcome:
    """Run every step against ``target`` and write the result (when ``output`` is given)."""
    started = now_iso()
    dataset = dataset or build_dataset(p)
    sampler = _sampler(p.telemetry_interval_s)
    sampler.start()

    def window_telemetry(step: StepResult) -> dict[str, Any] | None:
        out: dict[str, Any] = sampler.summary(*step.window, step.metrics["output_tokens"])
        return out

    client = StreamingClient(
        target.endpoint, target.model, p.api, ignore_eos=target.ignore_eos,
        min_tokens=target.min_tokens, timeout_s=p.timeout_s,
        max_connections=p.max_connections, api_key=api_key,
    )  # fmt: skip

    config = p.model_dump(mode="json")
    config["endpoint"] = target.endpoint
    config["served_model"] = target.model
    config["mode"] = p.mode
    config["slo"] = p.slo_targets().as_json()
    config["ignore_eos"], config["min_tokens"] = target.ignore_eos, target.min_tokens
    facts = hardware()
    partial = PartialWriter(output) if output is not None else None

    def assemble(done: list[StepResult], origin: float, extra: list[str]) -> dict[str, Any]:
        config["data"] = dataset.describe()  # after calibration: words per token known
        steps = [_step_json(s, origin) for s in done]
        warnings = list(extra)
        if client.fresh_connections:
            warnings.append(
                "the engine closed idle keep-alive connections: the client switched to one "
                "connection per request (each request pays a TCP connect, ~0.1 ms on loopback)"
            )
        for s in steps:
            for w in s["metrics"]["token_check"]["warnings"]:
                warnings.append(f"{s['name']}: {w}")
            fidelity = s["metrics"]["client"]
            if fidelity["degraded"]:
                warnings.append(f"{s['name']}: client fidelity degraded: "
                                + "; ".join(fidelity["reasons"]))  # fmt: skip
        return document(
            config=config, engine=target.engine, hardware_facts=facts, steps=steps,
            telemetry=sampler.info(), warnings=warnings, started_at=started,
            finished_at=now_iso(), calibration=runner.calibration,
        )  # fmt: skip

    def step_done(step: StepResult, done: list[StepResult], origin: float) -> None:
        # A long sweep that is interrupted keeps what it measured: result.partial.json and
        # its requests, rewritten after every step (the complete result replaces them).
        if partial is not None:
            partial.add(step, assemble(done, origin, runner.warnings), origin)

    runner = Runner(p, client, dataset, progress, window_telemetry, on_step=step_done)

    async def main() -> Any:
        with _signals_cancel(asyncio.current_task()):
            async with client:
                return await runner.run()

    try:
        outcome = asyncio.run(main())
    except asyncio.CancelledError:
        sampler.close()
        raise KeyboardInterrupt from None  # SIGTERM/SIGINT: the caller's clean-stop path
    except BaseException:
        sampler.close()
        raise
    sampler.stop()
    records = [r for s in outcome.steps for r in s.records]
    if not any(r.ok for r in records):
        first = next((r.error for r in records if r.error), "no request was sent")
        raise BenchError(f"every request failed; the first error: {first}")
    doc = assemble(outcome.steps, outcome.origin, outcome.warnings)
    files: dict[str, Path] = {}
    if output is not None:
        series = None
        if sampler.available:

            def series(path: Path) -> int:
                return sampler.write_series(path, t0=outcome.origin)

        files = write(output, doc, records, outcome.origin, series)
        if partial is not None:
            partial.remove()
    sampler.close()
    return Outcome(doc, records, outcome.origin, files)


@contextlib.contextmanager
def _signals_cancel(task: asyncio.Task[Any] | None) -> Iterator[None]:
    """While the event loop runs, SIGTERM/SIGINT cancel the run's task — a signal handler
    that raised inside the loop would land in whichever callback was running, leaving
    half-cancelled tasks behind. The previous handlers are put back afterwards."""
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    previous = {sig: signal.getsignal(sig) for sig in signals}
    if task is not None:
        for sig in signals:
            loop.add_signal_handler(sig, task.cancel)
    try:
        yield
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
            signal.signal(sig, previous[sig])


def _step_json(s: StepResult, origin: float) -> dict[str, Any]:
    return {
        "name": s.step.name, "load": s.step.as_json(), "repeat_index": s.repeat_index,
        "window": {"start_s": round(s.window[0] - origin, 6),
                   "end_s": round(s.window[1] - origin, 6),
                   "duration_s": round(s.window[1] - s.window[0], 6)},
        "metrics": s.metrics, "telemetry": s.telemetry,
    }  # fmt: skip


class PartialWriter:
    """``result.partial.json`` (the document so far, ``"partial": true``) and
    ``result.partial.requests.jsonl`` (appended step by step)."""

    def __init__(self, output: Path) -> None:
        output.parent.mkdir(parents=True, exist_ok=True)
        self.doc_path = sidecar(output, "partial.json")
        self.requests_path = sidecar(output, "partial.requests.jsonl")
        self.requests_path.unlink(missing_ok=True)

    def add(self, step: StepResult, doc: dict[str, Any], origin: float) -> None:
        with self.requests_path.open("a", encoding="utf-8") as fh:
            for rec in step.records:
                fh.write(json.dumps(rec.as_json(origin)) + "\n")
        doc["partial"] = True
        doc["files"] = {"requests": self.requests_path.name}
        write_json(self.doc_path, doc)

    def remove(self) -> None:
        self.doc_path.unlink(missing_ok=True)
        self.requests_path.unlink(missing_ok=True)


def api_key_from_env() -> str | None:
    """Engines behind an API key (vLLM ``--api-key``): from the environment, never argv."""
    return os.environ.get("KITT_API_KEY") or os.environ.get("OPENAI_API_KEY") or None


def elapsed(t0: float) -> str:
    return f"{time.monotonic() - t0:.1f} s"
