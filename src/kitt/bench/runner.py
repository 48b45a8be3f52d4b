"""Running the steps of a serving benchmark: warmup, measurement window, repeats.

One asyncio event loop drives every request. How faithfully it did so is measured and
reported with the numbers (``client`` in each step): the lag between when a request was
due and when it went out, how late the loop woke up (a busy loop stamps chunks late),
and the client's CPU use. A step where the client itself was the bottleneck is flagged
``degraded`` rather than passed off as the server's latency.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from kitt.bench import profiles
from kitt.bench.client import StreamingClient
from kitt.bench.datasets import WORDS, RequestSpec, Synthetic
from kitt.bench.metrics import Slo, distribution, step_metrics, window
from kitt.bench.params import ServeParams
from kitt.bench.profiles import Step
from kitt.bench.records import RequestRecord
from kitt.errors import KittError

LAG_DEGRADED_MS = 5.0  # p99 schedule or loop lag above this: timestamps are not trusted
CPU_DEGRADED = 0.9  # the client used >= 90 % of a core: it was (nearly) the bottleneck
LOOP_TICK_S = 0.005


class MeasurementError(KittError):
    """A step or a sweep that cannot produce a measurement."""


class Progress(Protocol):
    def step_started(self, step: Step, total: int | None, duration_s: float | None) -> None: ...
    def request_done(self, rec: RequestRecord) -> None: ...
    def step_finished(self, step: Step, metrics: dict[str, Any]) -> None: ...
    def message(self, text: str) -> None: ...


@dataclass
class StepResult:
    step: Step
    repeat_index: int
    records: list[RequestRecord]
    metrics: dict[str, Any]
    window: tuple[float, float]
    telemetry: dict[str, Any] | None = None


@dataclass
class RunOutcome:
    origin: float
    steps: list[StepResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class LoopMonitor:
    """Samples how late the event loop wakes up from a short sleep."""

    def __init__(self) -> None:
        self.lags_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(LOOP_TICK_S)
            self.lags_ms.append(max(0.0, (time.perf_counter() - t - LOOP_TICK_S) * 1000))

    def start(self) -> None:
        self.lags_ms = []
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        return self.lags_ms


class Runner:
    """Runs every step (times repeats) of one benchmark against one endpoint."""

    def __init__(
        self,
        params: ServeParams,
        client: StreamingClient,
        dataset: Any,
        progress: Progress,
        on_window: Callable[[StepResult], dict[str, Any] | None] | None = None,
        on_step: Callable[[StepResult, list[StepResult], float], None] | None = None,
    ) -> None:
        self.params = params
        self.client = client
        self.dataset = dataset
        self.progress = progress
        self.slo: Slo = params.slo_targets()
        self.on_window = on_window  # telemetry for a step's window, added to its result
        self.on_step = on_step  # (the step, every step so far, the run's origin)
        self._stream = 0
        self.calibration: dict[str, Any] | None = None
        self.warnings: list[str] = []
        self._done: list[StepResult] = []
        self._origin = 0.0

    # -- the whole run -----------------------------------------------------------------------

    async def run(self) -> RunOutcome:
        outcome = RunOutcome(origin=time.perf_counter(), steps=self._done,
                             warnings=self.warnings)  # fmt: skip
        self._origin = outcome.origin
        if self.params.calibrate and isinstance(self.dataset, Synthetic):
            self.calibration = await self.calibrate(outcome.warnings)
        steps = self._planned_steps()
        for repeat in range(self.params.repeat):
            if self.params.mode == "sweep":
                await self._sweep(repeat, steps)
            else:
                for step in steps:
                    await self.run_step(step, repeat)
        return outcome

    def _planned_steps(self) -> list[Step]:
        p = self.params
        if p.mode == "concurrency":
            return [profiles.closed(c) for c in p.concurrency_levels]
        if p.mode == "rate":
            return [profiles.open_loop(r, p.arrival, p.max_concurrency) for r in p.rate_levels]
        return [profiles.closed(1, "sync")]

    async def _sweep(self, repeat: int, planned: list[Step]) -> None:
        """sync → max throughput → rates in between; the rates found by the first repeat
        are reused so repeats stay comparable step by step."""
        sync = await self.run_step(profiles.closed(1, "sync"), repeat)
        peak = await self.run_step(
            profiles.closed(self.params.sweep_max_concurrency, "throughput"), repeat
        )
        if repeat == 0:
            low = sync.metrics["request_throughput"]
            high = peak.metrics["request_throughput"]
            if low <= 0 or high <= 0:
                raise MeasurementError(
                    "the sweep's synchronous and throughput steps completed no request "
                    f"({sync.metrics['errors']} and {peak.metrics['errors']} errors): there is "
                    "no rate to sweep; see the errors above"
                )
            rates = profiles.sweep_rates(low, high, self.params.sweep_steps)
            planned[:] = [
                profiles.open_loop(r, self.params.arrival, self.params.max_concurrency)
                for r in rates
            ]
            self.progress.message(
                f"sweep: sync {low:.2f} req/s, max {high:.2f} req/s → rates "
                + ", ".join(f"{r:g}" for r in rates)
            )
        for step in planned:
            await self.run_step(step, repeat)

    # -- input length calibration ------------------------------------------------------------

    async def calibrate(self, warnings: list[str]) -> dict[str, Any] | None:
        """Fit the engine's prompt tokens to our word count (two 1-token requests), so that
        ``--input-len`` means the model's tokens. Without ``usage`` we keep 1 word/token."""
        ds = self.dataset
        # Small probes: an engine's context per request can be small (llama.cpp splits -c
        # between its slots), and a rejected probe would leave the lengths uncalibrated.
        counts = (8, 8 + 32)
        measured = []
        rng = random.Random("calibration")
        for words in counts:
            # The same vocabulary the prompts are drawn from: repeated words tokenize
            # differently (merges) from a mix.
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            spec = RequestSpec(prompt=text, output_len=1)
            rec = RequestRecord(step="calibration", index=0, scheduled=time.perf_counter())
            await self.client.send(spec, rec)
            if rec.error is not None or rec.usage_prompt_tokens is None:
                why = rec.error or "the server reported no usage"
                warnings.append(f"input length not calibrated ({why}): 1 word ≈ 1 token assumed")
                return None
            measured.append(rec.usage_prompt_tokens)
        slope = (measured[1] - measured[0]) / (counts[1] - counts[0])
        if slope <= 0:
            warnings.append("input length not calibrated (token counts did not grow)")
            return None
        overhead = max(0, round(measured[0] - counts[0] * slope))
        ds.words_per_token = 1.0 / slope
        ds.overhead_tokens = overhead
        return {"tokens_per_word": round(slope, 4), "overhead_tokens": overhead}

    # -- one step ----------------------------------------------------------------------------

    async def run_step(self, step: Step, repeat: int) -> StepResult:
        p = self.params
        stream = repeat * 1000 + self._stream
        self._stream += 1
        requests = self.dataset.stream(stream)
        warm_n, warm_s = self._warmup(step)
        total = None if p.stop_prompts is None else p.stop_prompts + warm_n
        self.progress.step_started(step, total, p.duration_s)
        monitor = LoopMonitor()
        monitor.start()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        gate = _Gate(warm_n, warm_s, p.stop_prompts, p.duration_s, wall0)
        records: list[RequestRecord] = []
        if step.mode == "concurrency":
            await self._closed(step, repeat, requests, gate, records)
        else:
            await self._open(step, repeat, requests, gate, records)
        cpu = (time.process_time() - cpu0) / max(time.perf_counter() - wall0, 1e-9)
        lags = await monitor.stop()
        measured = [r for r in records if not r.warmup]
        if not measured:
            raise MeasurementError(f"step {step.name} measured no request (is the warmup longer "
                             "than the step?)")  # fmt: skip
        metrics = step_metrics(measured, self.slo)
        metrics["client"] = fidelity(measured, lags, cpu, step)
        result = StepResult(step, repeat, records, metrics, window(measured))
        if self.on_window is not None:
            result.telemetry = self.on_window(result)
        self.progress.step_finished(step, metrics)
        self._done.append(result)
        if self.on_step is not None:
            self.on_step(result, self._done, self._origin)
        return result

    def _warmup(self, step: Step) -> tuple[int, float | None]:
        p = self.params
        if p.warmup_s is not None:
            return 0, p.warmup_s
        if p.warmup is not None:
            return p.warmup, None
        if step.mode == "concurrency":
            return step.concurrency or 1, None  # one request per slot fills the pipeline
        return 0, None

    async def _closed(
        self, step: Step, repeat: int, requests: Iterator[RequestSpec], gate: _Gate,
        records: list[RequestRecord],
    ) -> None:  # fmt: skip
        counter = 0

        async def worker() -> None:
            nonlocal counter
            # The next request is built before its scheduled time is stamped: building a
            # long prompt is the client's work, not the engine's latency.
            spec = next(requests)
            body = self.client.body(spec)
            due = time.perf_counter()
            while True:
                warm = gate.admit(counter, due)
                if warm is None:
                    return
                rec = self._record(step, repeat, counter, due, spec, warm)
                counter += 1
                records.append(rec)
                await self.client.send(spec, rec, body)
                self.progress.request_done(rec)
                spec = next(requests)
                body = self.client.body(spec)
                due = time.perf_counter()

        await asyncio.gather(*(worker() for _ in range(step.concurrency or 1)))

    async def _open(
        self, step: Step, repeat: int, requests: Iterator[RequestSpec], gate: _Gate,
        records: list[RequestRecord],
    ) -> None:  # fmt: skip
        assert step.rate is not None  # noqa: S101 - open-loop steps always have a rate
        sem = asyncio.Semaphore(step.max_concurrency) if step.max_concurrency else None
        tasks: set[asyncio.Task[None]] = set()

        async def one(spec: RequestSpec, rec: RequestRecord, body: bytes) -> None:
            if sem is None:
                await self.client.send(spec, rec, body)
            else:
                async with sem:
                    await self.client.send(spec, rec, body)
            self.progress.request_done(rec)

        t0 = time.perf_counter() + 0.005
        offsets = _arrivals(step.rate, step.arrival or "poisson", self.params.seed + repeat)
        for index, offset in enumerate(offsets):
            due = t0 + offset
            warm = gate.admit(index, due)
            if warm is None:
                break
            spec = next(requests)
            body = self.client.body(spec)  # before the arrival time, not after it
            delay = due - time.perf_counter()
            # Behind schedule, still yield once: reading the streams in flight must not
            # wait for the dispatcher to catch up.
            await asyncio.sleep(max(delay, 0))
            rec = self._record(step, repeat, index, due, spec, warm)
            records.append(rec)
            task = asyncio.get_running_loop().create_task(one(spec, rec, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    @staticmethod
    def _record(
        step: Step, repeat: int, index: int, due: float, spec: RequestSpec, warm: bool
    ) -> RequestRecord:
        return RequestRecord(
            step=step.name, index=index, scheduled=due, warmup=warm, repeat_index=repeat,
            input_len_requested=spec.input_len, output_len_requested=spec.output_len,
        )  # fmt: skip


def _arrivals(rate: float, arrival: str, seed: int) -> Iterator[float]:
    """Endless arrival offsets, in blocks (a duration-bounded step does not know its count)."""
    block, base = 4096, 0.0
    while True:
        offsets = profiles.arrivals(block + 1, rate, arrival, seed)
        for offset in offsets[:-1]:
            yield base + offset
        base += offsets[-1]
        seed += 1


class _Gate:
    """Decides, for the request about to go out, whether it is warmup, measured or past the
    stop condition (None)."""

    def __init__(self, warm_n: int, warm_s: float | None, prompts: int | None,
                 duration_s: float | None, t0: float) -> None:  # fmt: skip
        self.warm_n = warm_n
        self.warm_until = t0 + warm_s if warm_s is not None else None
        self.prompts = prompts
        self.duration_s = duration_s
        self.window_start: float | None = None
        self.measured = 0

    def admit(self, index: int, due: float) -> bool | None:
        warm = due < self.warm_until if self.warm_until is not None else index < self.warm_n
        if warm:
            return True
        if self.window_start is None:
            self.window_start = due
        if self.prompts is not None and self.measured >= self.prompts:
            return None
        if self.duration_s is not None and due >= self.window_start + self.duration_s:
            return None
        self.measured += 1
        return False


def fidelity(
    measured: list[RequestRecord], loop_lags_ms: list[float], cpu: float, step: Step
) -> dict[str, Any]:
    """How much the client itself distorted this step (see module docstring)."""
    lag = distribution(r.queue_ms for r in measured if step.max_concurrency is None)
    loop = distribution(loop_lags_ms)
    reasons = []
    lag_p99, loop_p99 = lag.get("p99"), loop.get("p99")
    if isinstance(lag_p99, float) and lag_p99 > LAG_DEGRADED_MS:
        reasons.append(f"requests went out {lag_p99:.1f} ms late (p99)")
    if isinstance(loop_p99, float) and loop_p99 > LAG_DEGRADED_MS:
        reasons.append(f"the event loop woke up {loop_p99:.1f} ms late (p99)")
    if cpu >= CPU_DEGRADED:
        reasons.append(f"the client used {cpu:.0%} of a CPU core")
    return {
        "schedule_lag_ms": {"p50": lag.get("p50"), "p99": lag.get("p99")},
        "loop_lag_ms": {"p50": loop.get("p50"), "p99": loop.get("p99")},
        "cpu_fraction": round(cpu, 3),
        "degraded": bool(reasons),
        "reasons": reasons,
    }
