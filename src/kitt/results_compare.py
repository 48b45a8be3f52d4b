"""Reading, comparing and exporting serving results: one implementation for the CLI
(``kitt results compare/export``) and the dashboard (its comparison view and exports).

Documents come from agents and from files anyone made, so everything read from one is
treated as untrusted: numbers are taken only when they are numbers, and a missing or
malformed value is ``None`` (shown as "-"), never an exception.
"""

from __future__ import annotations

import csv
import io
import json
import math
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from kitt.protocol import ResultDetail

Better = Literal["higher", "lower"]

# What compare and export read from a step, by a dotted path into its ``metrics`` (the
# names the document's ``repeats`` use), with the direction that is an improvement.
STEP_METRICS: tuple[tuple[str, str, Better], ...] = (
    ("output_token_throughput", "out tok/s", "higher"),
    ("request_throughput", "req/s", "higher"),
    ("goodput", "goodput req/s", "higher"),
    ("ttft_ms.p50", "TTFT p50 ms", "lower"),
    ("ttft_ms.p99", "TTFT p99 ms", "lower"),
    ("tpot_ms.p50", "TPOT p50 ms", "lower"),
    ("tpot_ms.p99", "TPOT p99 ms", "lower"),
    ("itl_ms.p50", "ITL p50 ms", "lower"),
    ("e2e_ms.p50", "E2E p50 ms", "lower"),
    ("error_rate", "error rate", "lower"),
)
# Each ``summary`` field and the step metric it was taken from (for the noise estimate).
SUMMARY_OF_STEP = {
    "output_token_throughput": "best_output_token_throughput",
    "request_throughput": "request_throughput",
    "goodput": "goodput",
    "ttft_ms.p50": "ttft_ms_p50",
    "ttft_ms.p99": "ttft_ms_p99",
    "tpot_ms.p50": "tpot_ms_p50",
    "tpot_ms.p99": "tpot_ms_p99",
    "itl_ms.p50": "itl_ms_p50",
    "e2e_ms.p50": "e2e_ms_p50",
    "error_rate": "error_rate",
}
NOISE_RULE = "a difference exceeds run-to-run noise when |a - b| > 2*sqrt(std_a^2 + std_b^2)"
CSV_COLUMNS = (
    "result_id", "created_at", "source", "test_id", "agent", "gpu_model", "gpu_count",
    "engine", "engine_version", "model", "step", "repeat_index", "load_mode", "concurrency",
    "rate", "requests", "completed", "errors", "error_rate", "request_throughput",
    "output_token_throughput", "total_token_throughput", "ttft_ms_p50", "ttft_ms_p90",
    "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99", "itl_ms_p50", "itl_ms_p99", "e2e_ms_p50",
    "e2e_ms_p99", "goodput", "good_fraction", "energy_per_output_token_j",
)  # fmt: skip


# --- reading documents defensively ------------------------------------------------------


def number(value: Any) -> float | None:
    """``value`` if it is a finite JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def dig(obj: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def step_metric(step: Any, dotted: str) -> float | None:
    return number(dig(step, "metrics", *dotted.split(".")))


def steps_of(document: dict[str, Any]) -> list[dict[str, Any]]:
    steps = document.get("steps")
    return [s for s in steps if isinstance(s, dict)] if isinstance(steps, list) else []


def step_names(document: dict[str, Any]) -> list[str]:
    """Distinct step names, in run order (repeats of a step share its name)."""
    names: dict[str, None] = {}
    for step in steps_of(document):
        if isinstance(step.get("name"), str):
            names[step["name"]] = None
    return list(names)


def repeat_stats(document: dict[str, Any], step: str, dotted: str) -> tuple[float, float] | None:
    """(mean, std) of a step metric across repeats, when the document has them."""
    repeats = document.get("repeats")
    if not isinstance(repeats, list):
        return None
    for entry in repeats:
        if isinstance(entry, dict) and entry.get("name") == step:
            stats = dig(entry, "metrics", dotted)
            mean, std = number(dig(stats, "mean")), number(dig(stats, "std"))
            if mean is not None and std is not None:
                return mean, std
    return None


def step_value(document: dict[str, Any], step: str, dotted: str) -> float | None:
    """A step's metric: the mean across repeats when there are several runs of it."""
    stats = repeat_stats(document, step, dotted)
    if stats is not None:
        return stats[0]
    values = [v for s in steps_of(document) if s.get("name") == step
              if (v := step_metric(s, dotted)) is not None]  # fmt: skip
    return sum(values) / len(values) if values else None


# --- compare (the CLI's and the dashboard's) --------------------------------------------


@dataclass
class Comparison:
    """One metric across results: values, the run-to-run std when known, and deltas
    against the first result (the baseline)."""

    scope: str  # "summary" or a step name
    metric: str
    label: str
    better: Better
    values: list[float | None]
    stds: list[float | None]
    deltas_pct: list[float | None] = field(default_factory=list)
    # None: noise unknown (no repeats on one side); True/False: |Δ| exceeds the threshold.
    exceeds_noise: list[bool | None] = field(default_factory=list)
    noise_threshold: list[float | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        base, base_std = self.values[0], self.stds[0]
        for value, std in zip(self.values, self.stds, strict=True):
            self.deltas_pct.append(delta_pct(base, value))
            threshold = noise_threshold(base_std, std)
            self.noise_threshold.append(threshold)
            if threshold is None or base is None or value is None:
                self.exceeds_noise.append(None)
            else:
                self.exceeds_noise.append(abs(value - base) > threshold)
        self.deltas_pct[0] = None
        self.exceeds_noise[0] = None
        self.noise_threshold[0] = None

    def show(self, value: float | None) -> str:
        return fmt_rate(value) if self.metric.endswith("error_rate") else fmt(value)

    def as_json(self) -> dict[str, Any]:
        return {
            "scope": self.scope, "metric": self.metric, "better": self.better,
            "values": self.values, "std": self.stds, "delta_pct": self.deltas_pct,
            "noise_threshold": self.noise_threshold, "exceeds_noise": self.exceeds_noise,
        }  # fmt: skip


def delta_pct(base: float | None, value: float | None) -> float | None:
    """(value - base) / |base| in %; None when either is missing or base is 0 and not value."""
    if base is None or value is None:
        return None
    if base == 0:
        return 0.0 if value == 0 else None
    return (value - base) / abs(base) * 100.0


def delta_text(delta: float) -> str:
    """A change as the CLI and the dashboard show it: signed, one decimal (``+0.0`` for
    any change too small to show, never ``-0.0``)."""
    return f"{round(delta, 1) + 0.0:+.1f}"


def unchanged(delta: float) -> bool:
    """A change that shows as 0.0 %: called "no change", never better or worse (a +0.03 %
    change must not read "+0.0 % better")."""
    return round(delta, 1) == 0


def noise_threshold(std_a: float | None, std_b: float | None) -> float | None:
    """The smallest difference that is not run-to-run noise: 2*sqrt(std_a^2 + std_b^2)."""
    if std_a is None or std_b is None:
        return None
    return 2.0 * math.sqrt(std_a**2 + std_b**2)


def summary_comparisons(documents: Sequence[dict[str, Any]]) -> list[Comparison]:
    """The ``summary`` metrics (each result's best step), with the noise of that step."""
    rows = []
    for dotted, label, better in STEP_METRICS:
        key = SUMMARY_OF_STEP[dotted]
        values = [number(dig(d, "summary", key)) for d in documents]
        stds = []
        for d in documents:
            best = dig(d, "summary", "best_step")
            stats = repeat_stats(d, best, dotted) if isinstance(best, str) else None
            stds.append(stats[1] if stats else None)
        rows.append(Comparison("summary", key, label, better, values, stds))
    return rows


def compare(documents: Sequence[dict[str, Any]]) -> list[Comparison]:
    """Summary metrics, then each step of the baseline that another result also ran."""
    rows = summary_comparisons(documents)
    baseline, others = documents[0], documents[1:]
    for step in step_names(baseline):
        if not any(step in step_names(d) for d in others):
            continue
        for dotted, label, better in STEP_METRICS:
            values = [step_value(d, step, dotted) for d in documents]
            stds = [(s[1] if (s := repeat_stats(d, step, dotted)) else None) for d in documents]
            rows.append(Comparison(step, dotted, label, better, values, stds))
    return rows


# --- the dashboard's comparison: curves over load, latency percentiles, energy ---------

# The load a step ran at, by mode, as an x axis: closed loop (requests in flight) or open
# loop (requests started per second). A run can hold both (a sweep), so each mode is a
# curve of its own rather than two units on one axis.
LOAD_AXES: dict[str, str] = {"concurrency": "concurrency", "rate": "request rate (req/s)"}
LATENCY_PERCENTILES: tuple[tuple[str, float], ...] = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0))
# The metrics of the dashboard's table of changes: the summary's key numbers, then energy.
KEY_SUMMARY = ("best_output_token_throughput", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50",
               "tpot_ms_p99", "goodput")  # fmt: skip
KEY_LABELS = {
    "best_output_token_throughput": "Best output tok/s", "ttft_ms_p50": "TTFT p50 (ms)",
    "ttft_ms_p99": "TTFT p99 (ms)", "tpot_ms_p50": "TPOT p50 (ms)", "tpot_ms_p99": "TPOT p99 (ms)",
    "goodput": "Goodput (req/s)", "tokens_per_joule": "Output tokens per joule",
}  # fmt: skip


def load_point(step: dict[str, Any]) -> tuple[str, float] | None:
    """(mode, level) of a step's ``load``: its concurrency or its request rate."""
    load = step.get("load")
    mode = dig(load, "mode")
    if mode not in LOAD_AXES:
        return None
    level = number(dig(load, mode))
    return None if level is None else (mode, level)


def tokens_per_joule(document: dict[str, Any], step: str) -> float | None:
    """Output tokens per joule of GPU energy at a step: 1 / the mean of its runs'
    ``telemetry.energy_per_output_token_j``; None without telemetry."""
    runs = [s for s in steps_of(document) if s.get("name") == step]
    values = (number(dig(s, "telemetry", "energy_per_output_token_j")) for s in runs)
    per_token = [v for v in values if v is not None]
    if not per_token:
        return None
    mean = sum(per_token) / len(per_token)
    return 1.0 / mean if mean > 0 else None


@dataclass
class LoadCurve:
    """Per result, a metric at each load level of one mode (None: not run at that level)."""

    mode: str
    x: list[float]
    throughput: list[list[float | None]]
    tokens_per_joule: list[list[float | None]]

    @property
    def has_energy(self) -> bool:
        return any(v is not None for values in self.tokens_per_joule for v in values)


def load_curves(documents: Sequence[dict[str, Any]]) -> list[LoadCurve]:
    """Output throughput and tokens per joule over load, one curve per load mode found.

    Steps are matched by their load level, not their name, so runs with different step
    names still share the axis; repeats of a step count by their mean (as compare does).
    """
    levels: dict[str, dict[float, list[str | None]]] = {}
    for i, document in enumerate(documents):
        for name in step_names(document):
            step = next(s for s in steps_of(document) if s.get("name") == name)
            point = load_point(step)
            if point is None:
                continue
            names = levels.setdefault(point[0], {}).setdefault(point[1], [None] * len(documents))
            if names[i] is None:
                names[i] = name
    curves = []
    for mode in LOAD_AXES:
        if mode not in levels:
            continue
        x = sorted(levels[mode])
        steps = [[levels[mode][level][i] for level in x] for i in range(len(documents))]
        curves.append(LoadCurve(
            mode, x,
            [[step_value(d, n, "output_token_throughput") if n else None for n in names]
             for d, names in zip(documents, steps, strict=True)],
            [[tokens_per_joule(d, n) if n else None for n in names]
             for d, names in zip(documents, steps, strict=True)],
        ))  # fmt: skip
    return curves


def best_step(document: dict[str, Any]) -> str | None:
    best = dig(document, "summary", "best_step")
    return best if isinstance(best, str) else None


def latency_percentiles(
    documents: Sequence[dict[str, Any]], metric: str, steps: Sequence[str | None]
) -> list[list[float | None]]:
    """Per result, ``metric`` (``ttft_ms``, ``tpot_ms``) at each of LATENCY_PERCENTILES,
    at the step named for that result (its mean across repeats)."""
    return [
        [step_value(d, step, f"{metric}.{p}") if step else None for p, _ in LATENCY_PERCENTILES]
        for d, step in zip(documents, steps, strict=True)
    ]


def key_comparisons(documents: Sequence[dict[str, Any]]) -> list[Comparison]:
    """The dashboard's table of changes: the summary's key metrics (with the noise rule
    from the repeats, as ``kitt results compare``) and tokens per joule at the best step
    (no repeats of energy: its noise is unknown)."""
    by_metric = {row.metric: row for row in summary_comparisons(documents)}
    rows = [by_metric[key] for key in KEY_SUMMARY]
    energy = [tokens_per_joule(d, s) if (s := best_step(d)) else None for d in documents]
    rows.append(Comparison("summary", "tokens_per_joule", "tokens/J", "higher", energy,
                           [None] * len(documents)))  # fmt: skip
    for row in rows:
        row.label = KEY_LABELS[row.metric]
    return rows


# --- formatting -------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def fmt_rate(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:.2f}%"


# --- export -----------------------------------------------------------------------------


def csv_rows(result: ResultDetail) -> Iterable[dict[str, Any]]:
    base = {
        "result_id": result.id, "created_at": result.created_at.isoformat(),
        "source": result.source, "test_id": result.test_id, "agent": result.agent_name,
        "gpu_model": result.gpu_model, "gpu_count": result.gpu_count, "engine": result.engine,
        "engine_version": result.engine_version, "model": result.model,
    }  # fmt: skip
    for step in steps_of(result.document):
        load = step.get("load") if isinstance(step.get("load"), dict) else {}
        name = step.get("name")
        yield {
            **base,
            "step": name if isinstance(name, str) else None,
            "repeat_index": number(step.get("repeat_index")),
            "load_mode": dig(load, "mode") if isinstance(dig(load, "mode"), str) else None,
            "concurrency": number(dig(load, "concurrency")),
            "rate": number(dig(load, "rate")),
            **{column: step_metric(step, metric) for column, metric in (
                ("requests", "requests"), ("completed", "completed"), ("errors", "errors"),
                ("error_rate", "error_rate"), ("request_throughput", "request_throughput"),
                ("output_token_throughput", "output_token_throughput"),
                ("total_token_throughput", "total_token_throughput"),
                ("ttft_ms_p50", "ttft_ms.p50"), ("ttft_ms_p90", "ttft_ms.p90"),
                ("ttft_ms_p99", "ttft_ms.p99"), ("tpot_ms_p50", "tpot_ms.p50"),
                ("tpot_ms_p99", "tpot_ms.p99"), ("itl_ms_p50", "itl_ms.p50"),
                ("itl_ms_p99", "itl_ms.p99"), ("e2e_ms_p50", "e2e_ms.p50"),
                ("e2e_ms_p99", "e2e_ms.p99"), ("goodput", "goodput"),
                ("good_fraction", "good_fraction"))},
            "energy_per_output_token_j":
                number(dig(step, "telemetry", "energy_per_output_token_j")),
        }  # fmt: skip


def csv_cell(value: Any) -> Any:
    """Whole numbers without ``.0`` (counts read as counts), missing values empty, and text
    that a spreadsheet would run as a formula (a model or host name from an agent starting
    with ``=``, ``+``, ``-``, ``@``) defused with a leading quote (OWASP CSV injection)."""
    if value is None:
        return ""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


def csv_chunks(results: Iterable[ResultDetail]) -> Iterator[str]:
    """The CSV export a result at a time (the dashboard streams it): the header, then
    one row per step run."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for result in results:
        for row in csv_rows(result):
            writer.writerow({k: csv_cell(v) for k, v in row.items()})
        yield out.getvalue()
        out.seek(0)
        out.truncate()
    yield out.getvalue()


def to_csv(results: Iterable[ResultDetail]) -> str:
    return "".join(csv_chunks(results))


def json_chunks(results: Iterable[ResultDetail]) -> Iterator[str]:
    """The JSON export a result at a time: the same text as ``json.dumps(list, indent=2)``
    of the whole results, without holding every document at once."""
    first = True
    for result in results:
        item = json.dumps(result.model_dump(mode="json"), indent=2)
        yield ("[\n" if first else ",\n") + textwrap.indent(item, "  ")
        first = False
    yield "[]\n" if first else "\n]\n"


def to_json(results: Iterable[ResultDetail]) -> str:
    return "".join(json_chunks(results))
