"""Every metric definition on hand-built timelines (docs/metrics.md)."""

from __future__ import annotations

import itertools
import math
from array import array

import pytest

from kitt.bench.metrics import Slo, across_repeats, distribution, percentile, step_metrics
from kitt.bench.params import ParamsError, load_params, parse_slo
from kitt.bench.profiles import Step, arrivals, sweep_rates
from kitt.bench.records import RequestRecord
from kitt.bench.result import summary
from kitt.bench.runner import fidelity


def rec(
    scheduled: float,
    tokens: list[float],
    end: float,
    *,
    sent: float | None = None,
    usage: int | None = -1,
    error: str | None = None,
    first_chunk: float | None = None,
    requested: int | None = None,
    prompt_tokens: int | None = 10,
) -> RequestRecord:
    r = RequestRecord(step="s", index=0, scheduled=scheduled, output_len_requested=requested)
    r.sent = scheduled if sent is None else sent
    r.token_times = array("d", tokens)
    r.first_chunk = first_chunk if first_chunk is not None else (tokens[0] if tokens else None)
    r.chunks = len(tokens)
    r.end = end
    r.usage_completion_tokens = len(tokens) if usage == -1 else usage
    r.usage_prompt_tokens = prompt_tokens
    r.error = error
    return r


def test_single_request_definitions() -> None:
    r = rec(0.0, [0.100, 0.150, 0.200, 0.250], 0.260, sent=0.001)
    assert r.queue_ms == pytest.approx(1.0)
    assert r.ttft_ms == pytest.approx(100.0)  # from the scheduled time, not the send
    assert r.e2e_ms == pytest.approx(260.0)
    assert r.tpot_ms == pytest.approx((260.0 - 100.0) / 3)
    assert r.itl_ms() == pytest.approx([50.0, 50.0, 50.0])
    assert r.output_tps_per_user == pytest.approx(1000 / ((260.0 - 100.0) / 3))


def test_one_token_output_has_no_tpot_and_meets_a_tpot_slo() -> None:
    r = rec(0.0, [0.05], 0.06)
    assert r.tpot_ms is None
    assert r.itl_ms() == []
    assert Slo(ttft_ms=100, tpot_ms=1).met_by(r)
    assert not Slo(ttft_ms=40).met_by(r)
    m = step_metrics([r], Slo(tpot_ms=1))
    assert m["tpot_ms"]["count"] == 0 and m["tpot_ms"]["p50"] is None
    assert m["good_fraction"] == 1.0


def test_empty_first_chunk_does_not_count_as_first_token() -> None:
    # The engine sent a role-only chunk at 10 ms; the first text came at 80 ms.
    r = rec(0.0, [0.080, 0.090], 0.1, first_chunk=0.010)
    assert r.ttft_ms == pytest.approx(80.0)


def test_usage_beats_counted_chunks_for_tpot() -> None:
    # Two chunks carried 5 tokens (multi-token chunks): TPOT divides by the server's count.
    r = rec(0.0, [0.1, 0.2], 0.2, usage=5)
    assert r.output_tokens == 5
    assert r.tpot_ms == pytest.approx(100.0 / 4)


def test_error_mid_stream_counts_against_goodput_and_not_in_latencies() -> None:
    good = rec(0.0, [0.1, 0.2, 0.3], 0.3)
    broken = rec(0.0, [0.1, 0.2], 0.25, error="error in stream: boom")
    m = step_metrics([good, broken], Slo(ttft_ms=1000))
    assert m["requests"] == 2 and m["completed"] == 1 and m["errors"] == 1
    assert m["error_rate"] == 0.5
    assert m["ttft_ms"]["count"] == 1
    assert m["itl_ms"]["count"] == 2  # only the good request's gaps
    assert m["output_tokens"] == 3  # an error's partial output is not throughput
    assert m["good_fraction"] == 0.5
    assert m["error_kinds"] == {"error in stream: boom": 1}


def test_window_throughput_and_goodput() -> None:
    records = [
        rec(0.0, [0.1, 0.2], 1.0),
        rec(0.5, [0.7, 0.8], 2.0),  # window is 0 → 2 s
        rec(1.0, [1.6, 1.7], 1.8),  # TTFT 600 ms: misses the SLO
    ]
    m = step_metrics(records, Slo(ttft_ms=250))
    assert m["duration_s"] == pytest.approx(2.0)
    assert m["request_throughput"] == pytest.approx(1.5)
    assert m["output_token_throughput"] == pytest.approx(3.0)
    assert m["total_token_throughput"] == pytest.approx((6 + 30) / 2.0)
    assert m["goodput"] == pytest.approx(1.0)
    assert m["good_fraction"] == pytest.approx(2 / 3, abs=1e-4)


def test_no_slo_means_no_goodput() -> None:
    m = step_metrics([rec(0, [0.1], 0.2)], Slo())
    assert m["goodput"] is None and m["good_fraction"] is None


def test_warmup_records_are_excluded() -> None:
    warm = rec(0.0, [5.0], 5.0)
    warm.warmup = True
    m = step_metrics([warm, rec(10.0, [10.1, 10.2], 10.2)], Slo())
    assert m["requests"] == 1
    assert m["ttft_ms"]["mean"] == pytest.approx(100.0)


def test_percentiles_match_numpy_linear() -> None:
    values = sorted([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    # numpy.percentile(values, q) (method="linear"), computed by hand.
    assert percentile(values, 50) == pytest.approx(3.5)
    assert percentile(values, 90) == pytest.approx(6.0 + 0.3 * (9.0 - 6.0))
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 9.0
    d = distribution(values)
    assert d["mean"] == pytest.approx(31 / 8)
    assert d["std"] == pytest.approx(
        math.sqrt(sum((v - 31 / 8) ** 2 for v in values) / 8), abs=1e-4
    )
    assert d["count"] == 8
    assert distribution([])["p50"] is None


def test_token_checks_warn() -> None:
    no_usage = rec(0, [0.1, 0.2], 0.2, usage=None)
    m = step_metrics([no_usage], Slo())
    assert "no token usage" in m["token_check"]["warnings"][0]
    mismatch = rec(0, [0.1, 0.2], 0.2, usage=10)
    assert step_metrics([mismatch], Slo())["token_check"]["chunk_mismatch"] == 1
    short = rec(0, [0.1, 0.2], 0.2, requested=100)
    tc = step_metrics([short], Slo())["token_check"]
    assert tc["short_outputs"] == 1 and "fewer output tokens" in tc["warnings"][0]
    exact = rec(0, [0.1, 0.2], 0.2, requested=2)
    assert step_metrics([exact], Slo())["token_check"]["warnings"] == []


def test_across_repeats_uses_sample_std() -> None:
    st = across_repeats([10.0, 12.0, 14.0])
    assert (
        st["mean"] == 12.0
        and st["std"] == pytest.approx(2.0)
        and st["cv"] == pytest.approx(1 / 6, abs=1e-4)
    )
    assert across_repeats([5.0])["std"] == 0.0


def test_poisson_arrivals_have_the_asked_rate_and_are_seeded() -> None:
    a = arrivals(20_000, 50.0, "poisson", seed=1)
    assert a == arrivals(20_000, 50.0, "poisson", seed=1)
    assert 20_000 / a[-1] == pytest.approx(50.0, rel=0.03)
    gaps = [b - x for x, b in itertools.pairwise(a)]
    cv = math.sqrt(sum((g - 0.02) ** 2 for g in gaps) / len(gaps)) / 0.02
    assert cv == pytest.approx(1.0, rel=0.05)  # exponential gaps: CV 1
    assert arrivals(3, 4.0, "constant", 0) == [0.0, 0.25, 0.5]


def test_sweep_rates_lie_between() -> None:
    assert sweep_rates(1.0, 11.0, 4) == [3.0, 5.0, 7.0, 9.0]
    assert all(r > 2.0 for r in sweep_rates(2.0, 1.0, 2))  # no scaling: still probe above


def test_summary_takes_the_best_throughput_step() -> None:
    def step(name: str, tput: float, ttft: float) -> dict[str, object]:
        return {
            "name": name,
            "repeat_index": 0,
            "metrics": {
                "output_token_throughput": tput,
                "request_throughput": tput / 10,
                "goodput": None,
                "error_rate": 0.0,
                "ttft_ms": {"p50": ttft, "p99": ttft * 2},
                "tpot_ms": {"p50": 5.0, "p99": 6.0},
                "itl_ms": {"p50": 5.0},
                "e2e_ms": {"p50": 100.0},
            },
        }

    s = summary([step("c=1", 100.0, 10.0), step("c=4", 300.0, 20.0), step("c=16", 250.0, 80.0)])
    assert s["best_step"] == "c=4" and s["best_output_token_throughput"] == 300.0
    assert s["ttft_ms_p99"] == 40.0 and s["single_user_ttft_ms_p50"] == 10.0


def test_params_validation_names_the_problem() -> None:
    with pytest.raises(ParamsError, match="either endpoint"):
        load_params({"model": "m"})
    with pytest.raises(ParamsError, match="one load mode"):
        load_params({"model": "m", "endpoint": "http://x", "rate": "1", "concurrency": "2"})
    with pytest.raises(ParamsError, match="concurrency"):
        load_params({"model": "m", "endpoint": "http://x", "concurrency": "1,zero"})
    with pytest.raises(ParamsError, match="unknown_knob"):
        load_params({"model": "m", "endpoint": "http://x", "unknown_knob": 1})
    single = load_params({"model": "m", "endpoint": "http://x", "concurrency": 4, "rate": None})
    assert single.concurrency_levels == [4]
    assert load_params({"model": "m", "endpoint": "http://x", "rate": 2.5}).rate_levels == [2.5]
    p = load_params({"model": "m", "endpoint": "http://x", "concurrency": "1, 4,16"})
    assert p.concurrency_levels == [1, 4, 16] and p.mode == "concurrency"
    assert parse_slo("ttft_ms=500, tpot_ms=50") == Slo(ttft_ms=500, tpot_ms=50)
    with pytest.raises(ValueError, match="key one of"):
        parse_slo("latency=5")


def test_fidelity_flags_a_late_or_saturated_client() -> None:
    step = Step("rate=10", "rate", rate=10.0)
    on_time = [rec(float(i), [i + 0.1], i + 0.2, sent=i + 0.0002) for i in range(100)]
    ok = fidelity(on_time, [0.1] * 50, 0.2, step)
    assert ok["degraded"] is False and ok["reasons"] == []
    assert ok["schedule_lag_ms"]["p50"] == pytest.approx(0.2)
    late = [rec(float(i), [i + 0.1], i + 0.2, sent=i + 0.020) for i in range(100)]
    bad = fidelity(late, [9.0] * 50, 0.95, step)
    assert bad["degraded"] is True
    assert len(bad["reasons"]) == 3
    assert "20.0 ms late" in bad["reasons"][0] and "95%" in bad["reasons"][2]
    # With --max-concurrency, waiting for a slot is intended queueing, not client lag.
    capped = Step("rate=10", "rate", rate=10.0, max_concurrency=2)
    assert fidelity(late, [0.1] * 50, 0.2, capped)["degraded"] is False
