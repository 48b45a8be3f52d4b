"""Run-a-test form, test list and test page.

The form is checked by the code ``POST /api/v1/tests`` runs (the ``TestRequest`` model and
``pick_agent``), so the page and the API cannot disagree about what may be queued. The
serving benchmark's parameters are checked here too, with ``ServeParams``: the API
leaves that to the agent, which refuses a bad parameter when the test is dispatched (the
test then fails); a person filling in a form should hear it before anything is queued.

The test page renders its facts and its result on the server; the page's script follows
the log (SSE) and asks for the two fragments again when the stream says the test changed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from flask import (
    Blueprint,
    Response,
    current_app,
    make_response,
    redirect,
    render_template,
    request,
    url_for,
)
from pydantic import ValidationError

from kitt.bench.params import SLO_KEYS, ServeParams, parse_slo
from kitt.jsonapi import ApiFailure, int_arg
from kitt.protocol import (
    ANY_AGENT,
    SERVING_BENCHMARK,
    SERVING_RESULT_KIND,
    SUMMARY_METRICS,
    TERMINAL_STATUSES,
    ParamValue,
    TestRequest,
    param_value,
)
from kitt.results_compare import dig, number, step_metric
from kitt.server.api.fleet import MAX_HISTORY
from kitt.server.api.tests import (
    STATUSES,
    AgentChoiceError,
    find_test,
    info,
    pick_agent,
    queue_test,
)
from kitt.server.store.agents import AgentStore
from kitt.server.store.models import Agent, TestRun
from kitt.server.store.tests import TestStore
from kitt.server.web.pages import page_guard

bp = Blueprint("test_pages", __name__)
bp.before_request(page_guard)

# The serving benchmark's load parameters the form has fields for (ServeParams names);
# anything else goes in the "other parameters" box as KEY=VALUE lines.
LOAD_FIELDS = ("concurrency", "rate", "num_prompts", "duration_s", "input_len", "output_len")
SLO_FIELDS = {f"slo_{key}": key for key in SLO_KEYS}
# Form order: the first field with a message gets the focus.
FIELDS = ("agent", "benchmark", "engine", "model", "load", *LOAD_FIELDS, "sweep",
          *SLO_FIELDS, "params")  # fmt: skip
LABELS = {
    "agent": "Agent", "benchmark": "Benchmark", "engine": "Engine", "model": "Model",
    "load": "Load", "concurrency": "Concurrency levels", "rate": "Request rates (req/s)",
    "sweep": "Sweep", "num_prompts": "Requests per step", "duration_s": "Duration per step (s)",
    "input_len": "Input tokens", "output_len": "Output tokens",
    "slo_ttft_ms": "Time to first token limit (ms)",
    "slo_tpot_ms": "Time per output token limit (ms)",
    "slo_e2e_ms": "End-to-end latency limit (ms)",
    "params": "Parameters, one KEY=VALUE per line",
}  # fmt: skip
STATE_WORDS = {"idle": "idle", "running": "running a test", "error": "in error",
               "offline": "offline"}  # fmt: skip
MISSING_MODEL = "give the model: a name, path or tag the engine loads"
# Longer fields are refused (a params box cut short would queue something else).
MAX_FIELD_CHARS = 10_000
# Points per "over the run" chart: longer runs are averaged down (as agent.js does).
MAX_POINTS = 720
NO_VALUE = "\u2013"  # an en dash, as the pages' scripts show a missing number


def _tests() -> TestStore:
    return current_app.extensions["kitt.tests"]  # type: ignore[no-any-return]


def _agents() -> AgentStore:
    return current_app.extensions["kitt.agents"]  # type: ignore[no-any-return]


# --- the form ---------------------------------------------------------------------------


@dataclass(frozen=True)
class AgentOffer:
    """What one agent can run, for the form's choices (and its script's filtering)."""

    name: str
    state: str
    benchmarks: list[str]
    engines: list[str]

    @property
    def label(self) -> str:
        return f"{self.name} ({STATE_WORDS.get(self.state, self.state)})"


def _serving_first(benchmark: str) -> tuple[bool, str]:
    return benchmark != SERVING_BENCHMARK, benchmark


def _offer(agent: Agent) -> AgentOffer:
    caps = agent.capabilities
    benchmarks = sorted((c for c in caps if ":" not in c), key=_serving_first)
    engines = sorted(c.removeprefix("engine:") for c in caps if c.startswith("engine:"))
    state = agent.status if agent.online else "offline"
    return AgentOffer(agent.name, state, benchmarks, engines)


@dataclass
class TestForm:
    """The form as entered (kept on a refusal) and a message per field."""

    __test__ = False  # not a pytest test class, despite the name

    values: dict[str, str]
    errors: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> str:
        return self.values.get(name, "").strip()

    def refuse(self, name: str, message: str) -> None:
        self.errors.setdefault(name, message)

    @property
    def problems(self) -> list[tuple[str, str, str]]:
        """(the input to go to, its label, the message), in the form's order. A message
        about the load as a whole goes to its first input."""
        return [("concurrency" if f == "load" else f, LABELS[f], self.errors[f])
                for f in FIELDS if f in self.errors]  # fmt: skip

    @property
    def first_error(self) -> str | None:
        """The input to focus."""
        return self.problems[0][0] if self.errors else None


def _other_params(form: TestForm) -> dict[str, ParamValue]:
    """The "other parameters" box: KEY=VALUE lines, values typed as `kitt test run
    --param` types them (numbers, booleans and null as JSON, anything else as text)."""
    params: dict[str, ParamValue] = {}
    for line_no, text in enumerate(form.get("params").splitlines(), 1):
        line = text.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, raw = line.partition("=")
        key = key.strip()
        if not sep or not key:
            form.refuse("params", f"line {line_no}: {line[:60]!r} is not KEY=VALUE")
            continue
        value = param_value(raw.strip())
        if key in params:
            form.refuse("params", f"line {line_no}: {key} is given twice")
        params[key] = value
    return params


def _serving_params(form: TestForm, params: dict[str, ParamValue]) -> None:
    """Add the load and SLO fields to ``params``; each value is typed like the box's."""
    for name in LOAD_FIELDS:
        raw = form.get(name)
        if raw:
            _set_once(form, params, name, param_value(raw))
    if form.get("sweep"):
        _set_once(form, params, "sweep", True)
    slo = []
    for name, key in SLO_FIELDS.items():
        raw = form.get(name)
        if not raw:
            continue
        try:
            parse_slo(f"{key}={raw}")  # the serving benchmark's own rule and message
        except ValueError as exc:
            form.refuse(name, str(exc))
        else:
            slo.append(f"{key}={raw}")
    if slo:
        _set_once(form, params, "slo", ",".join(slo))
    for key in ("engine", "model"):
        if key in params:
            form.refuse("params", f"give the {key} in its own field above, not as a parameter")


def _set_once(form: TestForm, params: dict[str, ParamValue], key: str, value: ParamValue) -> None:
    if key in params:
        form.refuse("params", f"{key} has its own field above: remove it here")
    params[key] = value


def _check_serving(form: TestForm, req: TestRequest) -> None:
    """What the agent would refuse at dispatch (ServeParams), said now, field by field."""
    given = {"engine": req.engine, "model": req.model}
    try:
        ServeParams.model_validate({**req.params, **{k: v for k, v in given.items() if v}})
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            name = str(err["loc"][0]) if err["loc"] else ""
            message = err["msg"].removeprefix("Value error, ")
            if not name:  # a rule across fields: load mode, stop rule, engine or endpoint
                form.refuse("engine" if "endpoint" in message else "load", message)
            elif name == "model" and err["type"] == "missing":
                form.refuse("model", MISSING_MODEL)
            elif name in ("engine", "model", *LOAD_FIELDS, "sweep"):
                form.refuse(name, message)
            elif name == "slo":
                form.refuse("slo_ttft_ms", message)
            elif err["type"] == "extra_forbidden":
                form.refuse("params", f"{name}: unknown parameter (misspelt?)")
            else:
                form.refuse("params", f"{name}: {message}")


def _request_errors(form: TestForm, exc: ValidationError) -> None:
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        name = loc[0] if loc else "params"
        if name in ("agent", "benchmark", "engine", "model"):
            form.refuse(name, err["msg"])
        elif len(loc) >= 3 and loc[-1] == "[key]":
            form.refuse("params", f"{loc[1][:64]!r} is not a parameter name (letters, digits, "
                                  "'_', '.', '-'; starting with a letter or '_')")  # fmt: skip
        elif len(loc) >= 2:
            form.refuse("params", f"{loc[1]}: {err['msg']}")
        else:
            form.refuse("params", err["msg"])


def check_form(form: TestForm) -> tuple[TestRequest, Agent] | None:
    """The request and its agent, or None with ``form.errors`` saying why."""
    benchmark = form.get("benchmark")
    params = _other_params(form)
    if benchmark == SERVING_BENCHMARK:
        _serving_params(form, params)
    try:
        req = TestRequest(
            agent=form.get("agent") or ANY_AGENT, benchmark=benchmark,
            engine=form.get("engine") or None, model=form.get("model") or None, params=params,
        )  # fmt: skip
    except ValidationError as exc:
        _request_errors(form, exc)
        return None
    if benchmark == SERVING_BENCHMARK:
        _check_serving(form, req)
    try:
        agent = pick_agent(req)
    except AgentChoiceError as exc:
        form.refuse(exc.field, exc.message)
        return None
    return None if form.errors else (req, agent)


def _render_form(form: TestForm, status: int) -> Response:
    offers = [_offer(a) for a in _agents().list_agents()]
    benchmarks = sorted({b for o in offers for b in o.benchmarks} | {SERVING_BENCHMARK},
                        key=_serving_first)  # fmt: skip
    context = {
        "form": form,
        "labels": LABELS,
        "offers": offers,
        "offers_data": [asdict(o) for o in offers],
        "benchmarks": benchmarks,
        "engines": sorted({e for o in offers for e in o.engines}),
    }
    # htmx swaps only 2xx answers: it gets the form alone with 200; a plain post gets the
    # whole page with 422.
    if request.headers.get("HX-Request"):
        return make_response(render_template("test_new_form.html", **context), 200)
    return make_response(render_template("test_new.html", **context), status)


@bp.get("/tests/new")
def new_test() -> Response:
    agent = request.args.get("agent", ANY_AGENT)[:80]
    defaults = {"agent": agent, "benchmark": SERVING_BENCHMARK}
    return _render_form(TestForm(defaults), 200)


def _too_long(form: TestForm) -> bool:
    """Refuse each over-long field, kept as typed so it can be shortened there."""
    for name in FIELDS:
        size = len(form.values.get(name, ""))
        if size > MAX_FIELD_CHARS:
            form.refuse(name, f"too long: {size:,} characters (at most {MAX_FIELD_CHARS:,})")
    return bool(form.errors)


@bp.post("/tests/new")
def submit_test() -> Any:
    form = TestForm(dict(request.form.items()))
    checked = None if _too_long(form) else check_form(form)
    if checked is None:
        return _render_form(form, 422)
    test = queue_test(*checked)
    target = url_for("test_pages.test", test_id=test.id)
    if request.headers.get("HX-Request"):
        response = make_response("", 200)
        response.headers["HX-Redirect"] = target
        return response
    return redirect(target, 303)


# --- the list ----------------------------------------------------------------------------


@bp.get("/tests")
def tests() -> str:
    status = request.args.get("status") or None
    if status is not None and status not in STATUSES:
        raise ApiFailure(400, f"status must be one of {', '.join(STATUSES)}")
    agent = request.args.get("agent") or None
    limit = int_arg("limit", 100, 1, 1000)
    found = _tests().query(status=status, agent=agent, limit=limit)
    return render_template(
        "tests.html", tests=found, status=status, agent=agent, statuses=STATUSES,
        durations={t.id: _durations(t) for t in found}, terminal=TERMINAL_STATUSES,
    )  # fmt: skip


# --- one test ----------------------------------------------------------------------------


def duration_text(seconds: float | None) -> str:
    """Like the pages' ``kitt.fmt.duration``: "12.3 s", "4 min 5 s", "2 h 3 min"."""
    if seconds is None:
        return NO_VALUE
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m < 60 else f"{m // 60} h {m % 60} min"


def _durations(test: TestRun) -> dict[str, str]:
    """Waiting (submitted → started) and running (started → finished, or so far)."""
    now = datetime.now(timezone.utc)
    out = {}
    if test.started_at is not None:
        out["waited"] = duration_text((test.started_at - test.created_at).total_seconds())
        end = test.finished_at or now
        out["ran"] = duration_text(max((end - test.started_at).total_seconds(), 0.0))
    elif test.finished_at is None:
        out["waiting"] = duration_text((now - test.created_at).total_seconds())
    return out


def _facts(test: TestRun) -> dict[str, Any]:
    return {
        "test": info(test),
        "durations": _durations(test),
        "terminal": test.status in TERMINAL_STATUSES,
    }


def _result(test: TestRun) -> dict[str, Any]:
    doc = test.result
    serving = isinstance(doc, dict) and doc.get("kind") == SERVING_RESULT_KIND
    context: dict[str, Any] = {
        "test": info(test),
        "ended": test.status in TERMINAL_STATUSES,
        "serving": serving,
        "doc_text": None if doc is None else json.dumps(doc, indent=2, ensure_ascii=False),
    }
    if serving and doc is not None:
        summary = doc.get("summary") or {}
        context["summary"] = [
            (SUMMARY_LABELS[m][0], number_text(number(summary.get(m)), *SUMMARY_LABELS[m][1:]))
            for m in SUMMARY_METRICS
        ]
        context["best_step"] = summary.get("best_step")
        context["steps"] = [step_row(s) for s in doc.get("steps") or [] if isinstance(s, dict)]
        over_run, context["telemetry_note"] = telemetry_charts(test)
        context["charts"] = result_charts(doc) + over_run
        telemetry = doc.get("telemetry") or {}
        if isinstance(telemetry, dict) and telemetry.get("available") is False:
            context["no_telemetry"] = str(telemetry.get("reason") or "not available")
    return context


# The document's summary (the best step's metrics): label, decimals, scale.
SUMMARY_LABELS: dict[str, tuple[str, int, float]] = {
    "best_output_token_throughput": ("Output throughput (tokens/s)", 1, 1),
    "request_throughput": ("Requests/s", 2, 1),
    "ttft_ms_p50": ("Time to first token p50 (ms)", 1, 1),
    "ttft_ms_p99": ("Time to first token p99 (ms)", 1, 1),
    "tpot_ms_p50": ("Time per output token p50 (ms)", 2, 1),
    "tpot_ms_p99": ("Time per output token p99 (ms)", 2, 1),
    "itl_ms_p50": ("Inter-token latency p50 (ms)", 2, 1),
    "e2e_ms_p50": ("End-to-end latency p50 (ms)", 1, 1),
    "goodput": ("Goodput (requests/s within the SLOs)", 2, 1),
    "error_rate": ("Errors (%)", 2, 100),
}


def number_text(value: float | None, digits: int, scale: float = 1) -> str:
    return NO_VALUE if value is None else f"{value * scale:,.{digits}f}"


def step_row(step: dict[str, Any]) -> dict[str, str]:
    """One row of the steps table: the numbers ``kitt results show`` prints per step."""
    load = step.get("load")
    load = load if isinstance(load, dict) else {}
    what = [f"{k} {load[k]}" for k in ("concurrency", "rate") if load.get(k) is not None]
    run = step.get("repeat_index")
    suffix = f" (run {run + 1})" if isinstance(run, int) and run else ""
    return {
        "name": f"{step.get('name')}{suffix}",
        "load": ", ".join(what) or str(load.get("mode") or NO_VALUE),
        "rps": number_text(step_metric(step, "request_throughput"), 2),
        "otps": number_text(step_metric(step, "output_token_throughput"), 1),
        "ttft50": number_text(step_metric(step, "ttft_ms.p50"), 1),
        "ttft99": number_text(step_metric(step, "ttft_ms.p99"), 1),
        "tpot50": number_text(step_metric(step, "tpot_ms.p50"), 2),
        "tpot99": number_text(step_metric(step, "tpot_ms.p99"), 2),
        "errors": f"{number_text(step_metric(step, 'errors'), 0)} / "
                  f"{number_text(step_metric(step, 'requests'), 0)}",
    }  # fmt: skip


@bp.get("/tests/<test_id>")
def test(test_id: str) -> str:
    found = find_test(test_id)
    return render_template(
        "test.html", **_facts(found), result=_result(found),
        page_data={
            "id": found.id,
            "show": url_for("tests.show", test_id=found.id),
            "logs": url_for("tests.logs", test_id=found.id),
            "cancel": url_for("tests.cancel", test_id=found.id),
            "terminal": sorted(TERMINAL_STATUSES),
        },
    )  # fmt: skip


@bp.get("/tests/<test_id>/facts")
def test_facts(test_id: str) -> str:
    """The facts fragment, asked for again by the page when the test's state changes."""
    return render_template("test_facts.html", **_facts(find_test(test_id)))


@bp.get("/tests/<test_id>/result")
def test_result(test_id: str) -> str:
    """The result fragment, asked for again by the page when the test ends."""
    return render_template("test_result.html", result=_result(find_test(test_id)))


# --- charts ----------------------------------------------------------------------------
# Each chart is a kitt.chart spec (charts.js): the page's script only draws them.


def _step_gpus(step: dict[str, Any]) -> list[Any]:
    """The step's per-GPU telemetry (a list, one entry per GPU)."""
    gpus = dig(step, "telemetry", "gpus")
    return gpus if isinstance(gpus, list) else []


def _gpu_mean(step: dict[str, Any], gpu: int, metric: str) -> float | None:
    gpus = _step_gpus(step)
    return number(dig(gpus[gpu], metric, "mean")) if gpu < len(gpus) else None


def result_charts(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Latency and throughput per step (x: the step's concurrency when every step has its
    own, else the steps in order, named), and the steps' GPU telemetry. Repeated runs of
    a step: the first run's (the document's ``repeats`` hold the spread)."""
    steps = [s for s in doc.get("steps") or [] if isinstance(s, dict) and not s.get("repeat_index")]
    if not steps:
        return []
    levels = [number(dig(s, "load", "concurrency")) for s in steps]
    axis: dict[str, Any]
    if None not in levels and len(set(levels)) == len(levels):
        steps = [s for _, s in sorted(zip(levels, steps, strict=True), key=lambda p: p[0] or 0)]
        axis = {"x": sorted(levels), "xLabel": "concurrency"}
    else:
        axis = {"x": list(range(1, len(steps) + 1)), "xLabel": "step",
                "xValues": [str(s.get("name")) for s in steps]}  # fmt: skip

    def series(label: str, metric: str) -> dict[str, Any]:
        return {"label": label, "values": [step_metric(s, metric) for s in steps]}

    def chart(title: str, y: str, digits: int, *lines: dict[str, Any]) -> dict[str, Any]:
        return {"title": title, "yLabel": y, "digits": digits, "series": list(lines), **axis}

    charts = [
        chart("Time to first token", "ms", 1, series("p50", "ttft_ms.p50"),
              series("p99", "ttft_ms.p99")),
        chart("Time per output token", "ms", 2, series("p50", "tpot_ms.p50"),
              series("p99", "tpot_ms.p99")),
        chart("Output throughput", "tokens/s", 1,
              series("output tok/s", "output_token_throughput")),
    ]  # fmt: skip
    gpus = max((len(_step_gpus(s)) for s in steps), default=0)
    for title, metric, unit in (("GPU utilisation per step (mean)", "utilization_pct", "%"),
                                ("GPU power per step (mean)", "power_w", "W")):  # fmt: skip
        lines = [{"label": f"GPU {g}", "values": [_gpu_mean(s, g, metric) for s in steps]}
                 for g in range(gpus)]  # fmt: skip
        if any(v is not None for line in lines for v in line["values"]):
            charts.append(chart(title, unit, 1, *lines))
    return charts


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def average_down(
    x: list[float], series: list[list[float | None]], most: int = MAX_POINTS
) -> tuple[list[float], list[list[float | None]]]:
    """At most ``most`` points: buckets of ``ceil(n / most)`` consecutive samples, each
    shown at its last sample's time with the mean of its known values (agent.js's rule
    for the agent page's history), so a long run's page stays small."""
    size = math.ceil(len(x) / most)
    if size <= 1:
        return x, series
    starts = range(0, len(x), size)
    return ([x[min(i + size, len(x)) - 1] for i in starts],
            [[_mean(values[i:i + size]) for i in starts] for values in series])  # fmt: skip


TELEMETRY_METRICS = (
    ("GPU utilisation over the run", "utilization_pct", "%"),
    ("GPU memory used over the run", "memory_used_gb", "GB"),
    ("GPU power over the run", "power_w", "W"),
)


def telemetry_charts(test: TestRun) -> tuple[list[dict[str, Any]], str | None]:
    """The agent's GPUs over the run, from its heartbeats between the test's start and
    end (a later heartbeat is not the run's), averaged down to at most MAX_POINTS
    points; and a note saying how many heartbeats the charts stand for."""
    if test.agent_id is None or test.started_at is None:
        return [], None
    found = _agents().heartbeats(test.agent_id, test.started_at, MAX_HISTORY, test.finished_at)
    beats = [b for b in found if b.gpus]
    if not beats:
        return [], None
    gpus = sorted({g.get("index", 0) for b in beats for g in b.gpus})
    of_gpu = {i: [next((g for g in b.gpus if g.get("index", 0) == i), {}) for b in beats]
              for i in gpus}  # fmt: skip
    x = [b.ts.timestamp() for b in beats]
    shown = average_down(x, [])[0]
    charts = []
    for title, metric, unit in TELEMETRY_METRICS:
        values = average_down(x, [[number(g.get(metric)) for g in of_gpu[i]] for i in gpus])[1]
        if any(v is not None for line in values for v in line):
            lines = [{"label": f"GPU {i}", "values": v} for i, v in zip(gpus, values, strict=True)]
            charts.append({"title": title, "yLabel": unit, "digits": 1, "time": True,
                           "x": shown, "xLabel": "time", "series": lines})  # fmt: skip
    note = f"GPUs over the run: {len(beats):,} heartbeats"
    if len(shown) < len(beats):
        note += f", shown as {len(shown):,} averages"
    if len(found) == MAX_HISTORY:
        note += f" (only the run's last {MAX_HISTORY:,})"
    return charts, note + "."
