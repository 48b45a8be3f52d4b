"""What a person watching a run sees: a live progress bar on a terminal, periodic plain
lines in a log (an agent's test log is not a terminal), and the summary table."""

from __future__ import annotations

import time
from typing import Any

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from kitt.bench.profiles import Step
from kitt.bench.records import RequestRecord

LINE_EVERY_S = 5.0


def _num(value: Any) -> str:
    """Compact: 3 significant-ish digits, so the table fits an 80-column terminal."""
    if value is None:
        return "-"
    v = float(value)
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


def step_line(name: str, m: dict[str, Any]) -> str:
    """One line per finished step, for logs."""
    client = m.get("client") or {}
    degraded = " [client degraded: " + "; ".join(client["reasons"]) + "]" if client.get(
        "degraded") else ""  # fmt: skip
    return (
        f"{name}: {m['completed']}/{m['requests']} ok, {m['request_throughput']:.2f} req/s, "
        f"{m['output_token_throughput']:.1f} out tok/s, TTFT p50 {_num(m['ttft_ms']['p50'])} ms "
        f"p99 {_num(m['ttft_ms']['p99'])} ms, TPOT p50 {_num(m['tpot_ms']['p50'])} ms, "
        f"ITL p50 {_num(m['itl_ms']['p50'])} ms, errors {m['errors']}{degraded}"
    )


class LineProgress:
    """Plain progress lines every few seconds (and one per step) on a console."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._step = ""
        self._total: int | None = None
        self._done = self._errors = 0
        self._last = 0.0
        self._t0 = 0.0

    def step_started(self, step: Step, total: int | None, duration_s: float | None) -> None:
        self._step, self._total, self._done, self._errors = step.name, total, 0, 0
        self._t0 = self._last = time.monotonic()
        bound = f"{total} requests" if total is not None else f"{duration_s:g} s"
        self.console.print(f"step {escape(step.name)}: started ({bound}, warmup included)")

    def request_done(self, rec: RequestRecord) -> None:
        self._done += 1
        self._errors += rec.error is not None
        now = time.monotonic()
        if now - self._last >= LINE_EVERY_S:
            self._last = now
            of = f"/{self._total}" if self._total else ""
            rate = self._done / max(now - self._t0, 1e-9)
            self.console.print(f"step {escape(self._step)}: {self._done}{of} requests, "
                               f"{rate:.1f} req/s, {self._errors} errors")  # fmt: skip

    def step_finished(self, step: Step, metrics: dict[str, Any]) -> None:
        self.console.print(escape(step_line(step.name, metrics)))

    def message(self, text: str) -> None:
        self.console.print(escape(text))

    def close(self) -> None:
        pass


class BarProgress(LineProgress):
    """A rich progress bar per step on a terminal."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self._bar = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]} req/s · {task.fields[errors]} errors"),
            TimeElapsedColumn(), console=console, transient=False,
        )  # fmt: skip
        self._task: TaskID | None = None
        self._bar.start()

    def step_started(self, step: Step, total: int | None, duration_s: float | None) -> None:
        self._step, self._total, self._done, self._errors = step.name, total, 0, 0
        self._t0 = time.monotonic()
        self._task = self._bar.add_task(escape(step.name), total=total, rate="0.0", errors=0)

    def request_done(self, rec: RequestRecord) -> None:
        self._done += 1
        self._errors += rec.error is not None
        if self._task is not None:
            rate = self._done / max(time.monotonic() - self._t0, 1e-9)
            self._bar.update(self._task, advance=1, rate=f"{rate:.1f}", errors=self._errors)

    def step_finished(self, step: Step, metrics: dict[str, Any]) -> None:
        if self._task is not None:
            self._bar.update(self._task, total=self._done, completed=self._done)
        self._bar.console.print(escape(step_line(step.name, metrics)), highlight=False)

    def message(self, text: str) -> None:
        self._bar.console.print(escape(text))

    def close(self) -> None:
        self._bar.stop()


def summary_table(doc: dict[str, Any], width: int = 200) -> Table:
    """One row per step: load, throughput, latency percentiles, goodput, errors. On a
    narrow terminal the secondary columns go (the result file has everything)."""
    has_slo = any(s["metrics"].get("goodput") is not None for s in doc["steps"])
    has_energy = any(
        (s.get("telemetry") or {}).get("energy_per_output_token_j") is not None
        for s in doc["steps"]
    )
    table = Table(
        title=f"{escape(str(doc['config'].get('model')))} · "
        f"{escape(str(doc['engine'].get('name') or 'endpoint'))}",
        box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False,
    )  # fmt: skip
    cols = ["step", "req/s", "out\ntok/s", "TTFT\np50", "TTFT\np99", "TPOT\np50",
            "TPOT\np99", "ITL\np50", "E2E\np50", "tok/s\n/user", "errors"]  # fmt: skip
    if has_slo:
        cols.insert(-1, "goodput")
    if has_energy:
        cols.insert(-1, "J/tok")
    drop: set[str] = set()
    if width < 110:
        drop |= {"TPOT\np99", "tok/s\n/user"}
    if width < 90:
        drop |= {"E2E\np50", "ITL\np50"}
    keep = [i for i, col in enumerate(cols) if col not in drop]
    for i in keep:
        col = cols[i]
        table.add_column(col, justify="left" if col == "step" else "right", no_wrap=True)
    repeated = any(s["repeat_index"] for s in doc["steps"])
    for s in doc["steps"]:
        m = s["metrics"]
        name = f"{s['name']} #{s['repeat_index'] + 1}" if repeated else s["name"]
        if (m.get("client") or {}).get("degraded"):
            name += " ⚠"
        row = [escape(name), _num(m["request_throughput"]), _num(m["output_token_throughput"]),
               _num(m["ttft_ms"]["p50"]), _num(m["ttft_ms"]["p99"]), _num(m["tpot_ms"]["p50"]),
               _num(m["tpot_ms"]["p99"]), _num(m["itl_ms"]["p50"]), _num(m["e2e_ms"]["p50"]),
               _num(m["output_tps_per_user"]["p50"])]  # fmt: skip
        if has_slo:
            frac = m.get("good_fraction")
            row.append(f"{_num(m['goodput'])} ({frac:.0%})" if frac is not None else "-")
        if has_energy:
            row.append(_num((s.get("telemetry") or {}).get("energy_per_output_token_j")))
        row.append(str(m["errors"]) if not m["errors"] else f"[red]{m['errors']}[/red]")
        table.add_row(*(row[i] for i in keep))
    table.caption = "latencies in ms (TTFT/TPOT/ITL/E2E); ⚠ = client fidelity degraded"
    return table


def repeats_table(doc: dict[str, Any]) -> Table | None:
    if not doc.get("repeats"):
        return None
    table = Table(title="across repeats: mean ± std (CV)")
    table.add_column("step")
    keys = ("output_token_throughput", "ttft_ms.p50", "tpot_ms.p50", "itl_ms.p50")
    for key in keys:
        table.add_column(key, justify="right")
    for rep in doc["repeats"]:
        row = [escape(rep["name"])]
        for key in keys:
            st = rep["metrics"].get(key)
            if not st or st["mean"] is None:
                row.append("-")
                continue
            cv = f" ({st['cv']:.1%})" if st.get("cv") is not None else ""
            row.append(f"{st['mean']:,.2f} ± {st['std']:,.2f}{cv}")
        table.add_row(*row)
    return table
