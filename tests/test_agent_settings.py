"""Settings pushed by the server (``kitt agents set``): stored per agent, carried by
register and heartbeat responses, applied by the running agent without a restart.

Real server and agent processes (the ``kitt`` fixture) for the wire, the reaper and the
CLI; the agent-side rules (what is ignored, what reverts) also directly, where a server
would never send what they guard against.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import sqlite3
import statistics
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from alembic import command
from alembic.config import Config
from sqlalchemy import text

from conftest import Kitt, wait_for
from kitt.agent.config import AgentConfig
from kitt.agent.jobs import LogShipper, serving_job
from kitt.agent.log_streamer import LogLine
from kitt.agent.settings import PushedSettings
from kitt.agent.spool import Spool
from kitt.bench.engines import EngineOverride
from kitt.bench.params import ServeParams
from kitt.paths import ServerPaths
from kitt.protocol import (
    DEFAULT_LOG_BATCH_LINES,
    DEFAULT_TELEMETRY_INTERVAL_S,
    ENGINE_SETTING_FIELDS,
    LOCAL_ONLY_ENGINE_FIELDS,
    LOCAL_ONLY_KEYS,
    Heartbeat,
    RegisterRequest,
    RunTestPayload,
)
from kitt.server.reaper import Reaper
from kitt.server.settings import ServerSettings
from kitt.server.store.agents import AgentStore, BeatRecord
from kitt.server.store.db import MIGRATIONS, make_engine, migrate, sqlite_url
from kitt.server.store.tests import TestStore

NAME = "gpu-01"


def ts(record: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(record["ts"])


def gaps(beats: list[dict[str, Any]]) -> list[float]:
    return [(ts(b) - ts(a)).total_seconds() for a, b in itertools.pairwise(beats)]


def short_beats(values: list[float]) -> bool:
    """Beats at the 0.5 s default: typically ~0.5 s apart, none anywhere near 5 s (a
    loaded machine may delay one beat and bunch the next, hence the median)."""
    return statistics.median(values) < 1.0 and max(values) < 2.5


def beats_after(kitt: Kitt, since: datetime) -> list[dict[str, Any]]:
    return [b for b in kitt.heartbeats(NAME) if ts(b) > since]


def settings_of(kitt: Kitt) -> dict[str, Any]:
    response = kitt.api("GET", f"/api/v1/agents/{NAME}/settings")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def patch(kitt: Kitt, body: Any = None, content: str | None = None) -> tuple[int, str]:
    """PATCH the settings; returns the status and the error message (or the body)."""
    kw: dict[str, Any] = {"content": content} if content is not None else {"json": body}
    response = kitt.api(
        "PATCH", f"/api/v1/agents/{NAME}/settings",
        headers={"Content-Type": "application/json"}, **kw,
    )  # fmt: skip
    data = response.json()
    return response.status_code, data["error"] if "error" in data else json.dumps(data)


def start_fleet(kitt: Kitt, **agent_yaml: Any) -> None:
    kitt.start_server()
    kitt.init_agent(NAME)
    if agent_yaml:
        cfg = kitt.home / "agent.yaml"
        cfg.write_text(yaml.safe_dump({**yaml.safe_load(cfg.read_text()), **agent_yaml}))
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent(NAME).get("status") == "idle", what="the agent registered")


def agent_log(kitt: Kitt) -> str:
    return (kitt.home / "agent.log").read_text(errors="replace")


# --- through the fleet ----------------------------------------------------------------


def test_pushed_heartbeat_interval_applies_within_one_beat_and_resets(kitt: Kitt) -> None:
    start_fleet(kitt)
    before = wait_for(lambda: len(b := kitt.heartbeats(NAME)) >= 4 and b, what="4 heartbeats")
    assert short_beats(gaps(before[-4:])), gaps(before)

    status, body = patch(kitt, {"heartbeat_interval_s": 5})
    changed_at = datetime.now(timezone.utc)  # stored: every later beat's answer has it
    assert status == 200 and json.loads(body)["settings"] == {"heartbeat_interval_s": 5}

    # The server's global interval is 0.5 s: the old rule would call the agent offline
    # after 1.5 s of silence. Watch it through a whole 5 s gap; it must stay online.
    seen: list[bool] = []

    def long_gap() -> list[dict[str, Any]] | None:
        seen.append(kitt.agent(NAME)["online"])
        after = beats_after(kitt, changed_at)
        return after if len(after) >= 3 else None

    after = wait_for(long_gap, timeout=20, what="two 5 s heartbeat gaps", interval=0.2)
    # The beat after the change still comes at the old interval (its answer carries the
    # new one); from it on, the agent beats every 5 s ± 10 % jitter: no short gap after.
    # Bounds wide enough for a loaded 2-core CI machine, and still far from 0.5 s.
    assert (ts(after[0]) - changed_at).total_seconds() < 7.0
    assert all(4.0 < g < 7.0 for g in gaps(after)), gaps(after)
    assert len(seen) > 20 and all(seen), seen
    assert kitt.agent(NAME)["state"] == "idle"
    status = kitt.agent_status()
    assert status["settings"]["heartbeat_interval_s"] == 5

    out = kitt.run("agents", "set", NAME, "heartbeat_interval_s=", check=True).stdout
    reset_at = datetime.now(timezone.utc)
    assert re.search(r"heartbeat_interval_s\s+0\.5\s+default", out), out
    assert settings_of(kitt) == {
        "settings": {},
        "effective": {"heartbeat_interval_s": 0.5, "log_batch_lines": 500,
                      "telemetry_interval_s": 1.0},
    }  # fmt: skip
    # The agent is mid-way through a 5 s wait: its next beat learns the reset, and the
    # beats after it come every 0.5 s again.
    back = wait_for(lambda: len(b := beats_after(kitt, reset_at)) >= 5 and b, timeout=15,
                    what="heartbeats at the default interval again")  # fmt: skip
    assert (ts(back[0]) - reset_at).total_seconds() < 7.0
    assert short_beats(gaps(back)), gaps(back)
    assert kitt.agent_status()["settings"]["heartbeat_interval_s"] == 0.5
    assert "heartbeat interval is now 5 s" in agent_log(kitt)


def test_bad_settings_are_refused_and_nothing_is_stored(kitt: Kitt) -> None:
    start_fleet(kitt)
    refused = {
        "unknown key": ({"heartbeat_interval": 5}, "unknown setting 'heartbeat_interval' "
                        "(valid keys: heartbeat_interval_s, log_batch_lines, "
                        "telemetry_interval_s, engines.<engine>.startup_timeout_s)"),
        "a local-only key": ({"models_dir": "/etc"}, "'models_dir' is local to the agent: it "
                             "is set in the agent's agent.yaml, never by the server"),
        "a local-only key, reset": ({"server_url": None}, "'server_url' is local to the agent"),
        "an engine's binary": ({"engines.llama.cpp.binary": "/bin/sh"},
                               "'engines.llama.cpp.binary' is local to the agent: it is set in "
                               "the agent's agent.yaml (engines: llama.cpp: binary)"),
        "too short an interval": ({"heartbeat_interval_s": 1},
                                  "heartbeat_interval_s must be between 5 and 300, got 1"),
        "too long an interval": ({"heartbeat_interval_s": 301}, "between 5 and 300, got 301"),
        "no lines": ({"log_batch_lines": 0}, "log_batch_lines must be between 1 and 5000"),
        "half a line": ({"log_batch_lines": 2.5}, "log_batch_lines: Input should be a valid "
                        "integer, got 2.5"),
        "a number as text": ({"telemetry_interval_s": "1"}, "telemetry_interval_s: Input "
                             "should be a valid number, got '1'"),
        "a boolean": ({"heartbeat_interval_s": True}, "Input should be a valid number"),
        "an engine the agent lacks": ({"engines.nosuch.startup_timeout_s": 60},
                                      "engines.nosuch.startup_timeout_s: agent gpu-01 has no "
                                      "engine 'nosuch' (it advertises none)"),
        "an engine timeout out of range": ({"engines.nosuch.startup_timeout_s": 0},
                                           "must be between 1 and 7200"),
        # One bad key sinks the whole change: the good one is not stored either.
        "good and bad together": ({"log_batch_lines": 10, "telemetry_interval_s": 99},
                                  "telemetry_interval_s must be between 0.1 and 60, got 99"),
    }  # fmt: skip
    for what, (body, message) in refused.items():
        status, error = patch(kitt, body)
        assert status == 400 and message in error, (what, status, error)
    for what, content, message in [
        ("malformed JSON", '{"log_batch_lines": 1', "request body must be valid JSON"),
        ("a list", "[1, 2]", "request body must be a JSON object"),
        ("a string", '"log_batch_lines=5"', "request body must be a JSON object"),
    ]:
        status, error = patch(kitt, content=content)
        assert (status, error) == (400, message), what
    assert settings_of(kitt)["settings"] == {}

    for method in ("GET", "PATCH"):
        missing = kitt.api(method, "/api/v1/agents/nosuch/settings", json={})
        assert missing.status_code == 404
        assert missing.json()["error"] == "no agent with id or name 'nosuch'"
    assert kitt.api("GET", f"/api/v1/agents/{NAME}/settings", token=None).status_code == 401

    # The CLI: each problem on one line, exit 1, whether the server or the CLI saw it.
    for args, line in [
        (["models_dir=/etc"], "error: server answered 400: 'models_dir' is local to the agent"),
        (["heartbeat_interval_s=fast"], "error: heartbeat_interval_s=fast: not a number"),
        (["heartbeat_interval_s"], "error: 'heartbeat_interval_s': expected KEY=VALUE"),
        (["log_batch_lines=1", "log_batch_lines=2"], "error: log_batch_lines is given twice"),
    ]:
        r = kitt.run("agents", "set", NAME, *args)
        assert r.returncode == 1 and r.stderr.startswith(line), (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = kitt.run("agents", "settings", "nosuch")
    assert r.returncode == 1
    assert r.stderr.strip() == "error: server answered 404: no agent with id or name 'nosuch'"
    assert settings_of(kitt)["settings"] == {}

    # Defence in depth: settings a server should never have stored (written into its
    # database behind its back) are skipped by the agent, one warning, and the valid
    # one still applies; the server still answers for them.
    db = sqlite3.connect(kitt.home / "server" / "kitt.db")
    with db:
        db.execute("UPDATE agents SET settings = ? WHERE name = ?", (json.dumps({
            "models_dir": "/etc", "log_batch_lines": 99999, "telemetry_interval_s": 0.5}), NAME))  # fmt: skip
    db.close()
    wait_for(lambda: kitt.agent_status()["settings"]["telemetry_interval_s"] == 0.5,
             what="the agent to apply the valid setting")  # fmt: skip
    assert kitt.agent_status()["settings"]["log_batch_lines"] == 500
    warnings = [line for line in agent_log(kitt).splitlines() if "ignoring settings" in line]
    assert len(warnings) == 1, warnings  # once, not at every heartbeat
    assert "'models_dir' is local to the agent" in warnings[0]
    assert "log_batch_lines must be between 1 and 5000, got 99999" in warnings[0]
    assert settings_of(kitt)["effective"]["log_batch_lines"] == 500
    assert kitt.agent(NAME)["online"] is True


def test_log_batch_lines_applies_to_the_next_test(kitt: Kitt) -> None:
    kitt.start_server()
    kitt.init_agent(NAME)
    cfg = kitt.home / "agent.yaml"
    cfg.write_text(cfg.read_text() + "log_level: debug\n")  # batches are logged at debug
    kitt.add_benchmark("spew", "spew.py", timeout_s=60)
    kitt.run("agent", "start", check=True)
    wait_for(lambda: kitt.agent(NAME).get("status") == "idle", what="the agent registered")

    kitt.run("agents", "set", NAME, "log_batch_lines=10", check=True)
    wait_for(lambda: kitt.agent_status()["settings"]["log_batch_lines"] == 10,
             what="the agent to apply log_batch_lines")  # fmt: skip
    test = kitt.submit("spew", LINES=50)
    done = kitt.wait_status(test["id"], "completed")
    stored = kitt.api("GET", f"/api/v1/tests/{done['id']}/logs", params={"format": "text"})
    lines = stored.text.splitlines()
    assert lines == [f"{i:08d} " + "x" * 20 for i in range(50)]
    pattern = re.compile(rf"test {done['id']}: log batch of (\d+) lines spooled")
    batches = [int(n) for n in pattern.findall(agent_log(kitt))]
    assert sum(batches) == 50 and max(batches) == 10, batches
    assert len(batches) >= 5


def test_settings_survive_server_and_agent_restarts(kitt: Kitt) -> None:
    start_fleet(kitt)
    out = kitt.run("agents", "set", NAME, "log_batch_lines=10", "telemetry_interval_s=0.25",
                   check=True).stdout  # fmt: skip
    assert re.search(r"telemetry_interval_s\s+0\.25\s+set on the server", out), out
    expected = {"log_batch_lines": 10, "telemetry_interval_s": 0.25}
    assert settings_of(kitt)["settings"] == expected

    assert kitt.run("server", "stop").returncode == 0
    kitt.start_server()
    assert settings_of(kitt)["settings"] == expected
    shown = json.loads(kitt.run("agents", "settings", NAME, "--json", check=True).stdout)
    assert shown == {"settings": expected, "effective": {"heartbeat_interval_s": 0.5, **expected}}
    table = kitt.run("agents", "settings", NAME, check=True).stdout
    assert re.search(r"log_batch_lines\s+10\s+set on the server", table), table
    assert re.search(r"heartbeat_interval_s\s+0\.5\s+default", table), table

    assert kitt.run("agent", "stop").returncode == 0
    kitt.run("agent", "start", check=True)
    status = kitt.agent_status()
    assert {k: status["settings"][k] for k in expected} == expected
    # Applied from the registration answer, before the first heartbeat of this run.
    log = agent_log(kitt)
    restart = log.rindex("listening on")
    applied = log.index("setting log_batch_lines = 10 (pushed by the server)", restart)
    assert applied < log.index("registered as", restart)
    cli = kitt.run("agent", "status", check=True).stdout
    assert "log_batch_lines=10" in cli and "telemetry_interval_s=0.25" in cli

    # Reset one key: the agent goes back to the default for it and keeps the other.
    kitt.run("agents", "set", NAME, "log_batch_lines=", check=True)
    wait_for(lambda: kitt.agent_status()["settings"]["log_batch_lines"] == 500,
             what="log_batch_lines back to its default")  # fmt: skip
    assert kitt.agent_status()["settings"]["telemetry_interval_s"] == 0.25
    assert "setting log_batch_lines is back to its default" in agent_log(kitt)


def test_serving_tests_get_the_pushed_telemetry_interval_and_engine_timeout(
    kitt: Kitt,
) -> None:
    # An engine with a dot in its name, run by the agent: the simulator.
    engine = {"binary": sys.executable, "model_kind": "name", "startup_timeout_s": 30,
              "argv": ["{binary}", "-m", "kitt.bench.simulator", "--host", "{host}",
                       "--port", "{port}", "--model", "{model_name}", "--ttft-ms", "5",
                       "--itl-ms", "1"]}  # fmt: skip
    start_fleet(kitt, engines={"sim.eng": engine})
    assert "engine:sim.eng" in kitt.agent(NAME)["capabilities"]
    key = "engines.sim.eng.startup_timeout_s"
    assert kitt.agent_status()["settings"][key] == 30  # the agent's own, before any push

    kitt.run("agents", "set", NAME, "telemetry_interval_s=0.25", f"{key}=42", check=True)
    wait_for(lambda: kitt.agent_status()["settings"][key] == 42, what="the engine timeout")
    assert settings_of(kitt)["effective"][key] == 42
    body = {"agent": NAME, "benchmark": "serving", "engine": "sim.eng", "model": "sim",
            "params": {"concurrency": 1, "num_prompts": 3, "input_len": 8, "output_len": 4,
                       "calibrate": False}}  # fmt: skip
    submitted = kitt.api("POST", "/api/v1/tests", json=body)
    assert submitted.status_code == 202, submitted.text
    done = kitt.wait_status(submitted.json()["id"], "completed", "failed", timeout=120)
    assert done["status"] == "completed", done
    config = done["result"]["config"]
    assert config["telemetry_interval_s"] == 0.25 and config["engine_timeout_s"] == 42
    assert done["result"]["steps"][0]["metrics"]["requests"] == 3


# --- the parts, directly ----------------------------------------------------------------


def test_local_only_keys_are_every_agent_yaml_key() -> None:
    """The lists the server checks against cannot drift from agent.yaml's fields."""
    assert set(AgentConfig.model_fields) == LOCAL_ONLY_KEYS
    assert set(EngineOverride.model_fields) == LOCAL_ONLY_ENGINE_FIELDS | set(ENGINE_SETTING_FIELDS)
    assert ServeParams.model_fields["telemetry_interval_s"].default == DEFAULT_TELEMETRY_INTERVAL_S
    assert LogShipper.MAX_LINES == DEFAULT_LOG_BATCH_LINES


def test_agent_ignores_what_it_must_not_take_and_reverts_what_is_gone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    settings = PushedSettings({"llama.cpp": 120.0})
    caplog.set_level(logging.INFO, "kitt.agent.settings")
    pushed = {
        "heartbeat_interval_s": 5, "log_batch_lines": 10,
        "engines.llama.cpp.startup_timeout_s": 600, "engines.vllm.startup_timeout_s": 60,
        "models_dir": "/etc", "engines.llama.cpp.binary": "/bin/sh", "surprise": 1,
        "telemetry_interval_s": 0.01,
    }  # fmt: skip
    assert settings.apply(pushed, 0.5) == 5
    assert settings.apply(pushed, 0.5) == 5  # the same set again: no second warning
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for part in ("'models_dir' is local to the agent", "'engines.llama.cpp.binary' is local",
                 "unknown setting 'surprise'", "telemetry_interval_s must be between 0.1 and 60",
                 "this agent has no engine 'vllm'"):  # fmt: skip
        assert part in warnings[0], part
    assert settings.effective() == {
        "heartbeat_interval_s": 5, "log_batch_lines": 10, "telemetry_interval_s": 1.0,
        "engines.llama.cpp.startup_timeout_s": 600,
    }  # fmt: skip
    assert settings.serving_defaults("llama.cpp") == {"engine_timeout_s": 600}
    assert settings.serving_defaults(None) == {}

    # Keys removed on the server go back to their defaults; the server's interval rules.
    assert settings.apply({"telemetry_interval_s": 0.5}, 0.5) == 0.5
    assert settings.effective() == {
        "heartbeat_interval_s": 0.5, "log_batch_lines": 500, "telemetry_interval_s": 0.5,
        "engines.llama.cpp.startup_timeout_s": 120.0,
    }  # fmt: skip
    assert "setting log_batch_lines is back to its default" in caplog.text


def test_serving_job_fills_in_pushed_defaults_unless_the_test_sets_them(tmp_path: Path) -> None:
    config = AgentConfig(name="a", server_url="http://127.0.0.1:1", allow_any_model_path=True)
    settings = PushedSettings({"ollama": 60.0})
    settings.apply({"telemetry_interval_s": 0.25, "engines.ollama.startup_timeout_s": 42}, 30)
    payload = RunTestPayload(benchmark="serving", engine="ollama", model="llama3",
                             params={"concurrency": 1})  # fmt: skip
    job, _ = serving_job(payload, config, None, settings)
    assert job.params["telemetry_interval_s"] == 0.25 and job.params["engine_timeout_s"] == 42
    own = payload.model_copy(update={"params": {"telemetry_interval_s": 2, "engine_timeout_s": 9}})
    job, _ = serving_job(own, config, None, settings)
    assert job.params["telemetry_interval_s"] == 2 and job.params["engine_timeout_s"] == 9
    job, _ = serving_job(payload, config, None, PushedSettings({"ollama": 60.0}))
    assert "telemetry_interval_s" not in job.params and "engine_timeout_s" not in job.params


def test_log_shipper_batches_at_the_pushed_size(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    size = [10]
    shipper = LogShipper(spool, "tst_1", max_lines=lambda: size[0])
    lines = [LogLine(seq=i + 1, ts="2026-01-01T00:00:00Z", line=f"line {i}") for i in range(50)]
    shipper.add(lines[:25])
    size[0] = 7  # read at every batch: a change applies to the next one
    shipper.add(lines[25:])
    shipper.flush()
    batches = [json.loads(item.read_text())["body"]["lines"] for item in spool.items()]
    assert [len(b) for b in batches] == [10, 10, 5, 7, 7, 7, 4]
    assert [line["seq"] for b in batches for line in b] == list(range(1, 51))


def _store(tmp_path: Path) -> AgentStore:
    engine = make_engine(sqlite_url(tmp_path / "kitt.db"))
    migrate(engine)
    return AgentStore(engine)


def test_reaper_counts_each_agent_by_its_own_interval(tmp_path: Path) -> None:
    store = _store(tmp_path)
    now = datetime.now(timezone.utc)
    ids = {}
    for name in ("slow", "default", "quiet"):
        req = RegisterRequest(name=name, hostname="h", port=1, kitt_version="x")
        ids[name], _ = store.register(req, None, now - timedelta(hours=1))
    beat = Heartbeat(status="idle", uptime_s=1)
    store.record_beats([
        BeatRecord(ids["slow"], now - timedelta(seconds=100), beat),  # allowance 3 x 300 s
        BeatRecord(ids["default"], now - timedelta(seconds=100), beat),  # 3 x 30 s
        BeatRecord(ids["quiet"], now - timedelta(seconds=1000), beat),  # 3 x 300 s
    ])  # fmt: skip
    for name in ("slow", "quiet"):
        assert store.update_settings(ids[name], lambda s: {**s, "heartbeat_interval_s": 300.0})
    settings = ServerSettings(paths=ServerPaths(tmp_path), heartbeat_interval_s=30)
    reaper = Reaper(store, TestStore(store.engine), settings, started=now - timedelta(days=1))
    reaper.tick()
    assert {a.name: a.online for a in store.list_agents()} == {
        "default": False, "quiet": False, "slow": True}  # fmt: skip
    # Just started: silence before the start does not count, whatever the interval.
    store.register(RegisterRequest(name="quiet", hostname="h", port=1, kitt_version="x"),
                   None, now - timedelta(seconds=1000))  # fmt: skip
    Reaper(store, TestStore(store.engine), settings, started=now - timedelta(seconds=600)).tick()
    assert store.find("quiet").online is True  # type: ignore[union-attr]
    # And the heartbeat answer carries the settings with the check that the agent exists.
    assert store.record_beats(
        [BeatRecord(ids["slow"], now, beat), BeatRecord("agt_x", now, beat)]
    ) == [
        {"heartbeat_interval_s": 300.0},
        None,
    ]


def test_migration_backfills_last_seen_for_existing_agents(tmp_path: Path) -> None:
    engine = make_engine(sqlite_url(tmp_path / "kitt.db"))
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0005")
    seen = datetime(2026, 11, 27, 9, 0, tzinfo=timezone.utc)
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO agents (id, name, hostname, port, kitt_version, gpu_count, hardware, "
            "capabilities, registered_at, online, status, last_seen_at, gpus) VALUES ('agt_1', "
            "'old', 'h', 1, 'x', 0, '{}', '[]', :t, 1, 'idle', :t, '[]')"), {"t": "2026-11-27 09:00:00.000000"})  # fmt: skip
    migrate(engine)
    store = AgentStore(engine)
    agent = store.find("old")
    assert agent is not None and agent.settings == {} and agent.heartbeat_interval_s is None
    assert agent.last_seen_epoch == seen.timestamp()
