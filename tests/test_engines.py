"""Engine definitions, model resolution, capabilities, and engine processes.

Engine processes are real: tests/fake_engine.py runs as the engine, defined the way an
operator would in agent.yaml (an ``engines:`` entry whose argv runs it with this Python),
under the real guard, on a free port. Processes are checked with psutil afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import yaml

from conftest import wait_for
from kitt.agent.config import load_config
from kitt.agent.hardware import capabilities
from kitt.bench.engines import (
    EngineError,
    EngineProcess,
    EngineSpec,
    agent_settings,
    available_engines,
    engine_version,
    get_engine,
    load_engines,
    resolve_model,
)
from kitt.errors import ConfigError

FAKE_ENGINE = Path(__file__).parent / "fake_engine.py"


def fake_spec(*flags: str, **settings: Any) -> EngineSpec:
    """The fake engine, defined as agent.yaml would define a new engine."""
    entry = {
        "binary": sys.executable,
        "argv": ["{binary}", str(FAKE_ENGINE), "--host", "{host}", "--port", "{port}",
                 "--model", "{model}", *flags],
        "version_command": ["{binary}", str(FAKE_ENGINE), "--version"],
        "version_regex": r"version: (\d+)",
        "version_prefix": "b",
        "model_kind": "file",
        "startup_timeout_s": 20,
        "stop_grace_s": 5,
        **settings,
    }  # fmt: skip
    return load_engines({"fake": entry})["fake"]


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def pids_in(lines: list[str], marker: str) -> list[int]:
    return [int(line.rsplit(" ", 1)[1]) for line in lines if marker in line]


@pytest.fixture
def model(tmp_path: Path) -> Path:
    path = tmp_path / "models" / "tiny.gguf"
    path.parent.mkdir()
    path.write_bytes(b"GGUF")
    return path


# --- definitions ---------------------------------------------------------------------------


def test_shipped_engines() -> None:
    specs = load_engines()
    assert set(specs) == {"llama.cpp", "vllm", "sglang", "ollama"}
    llama = specs["llama.cpp"]
    assert llama.binary == "llama-server" and llama.model_kind == "file"
    assert llama.argv[:3] == ["{binary}", "-m", "{model}"] and "--metrics" in llama.argv
    assert (llama.health_path, llama.default_port, llama.startup_timeout_s) == (
        "/health",
        8080,
        120,
    )
    assert (llama.ignore_eos, llama.min_tokens) == (True, False)
    vllm = specs["vllm"]
    assert vllm.argv[:3] == ["{binary}", "serve", "{model}"] and vllm.model_kind == "dir"
    assert vllm.startup_timeout_s == 900
    assert (vllm.ignore_eos, vllm.min_tokens) == (True, True)
    sglang = specs["sglang"]
    assert sglang.argv[1:3] == ["-m", "sglang.launch_server"] and sglang.check_command
    assert (sglang.ignore_eos, sglang.min_tokens) == (True, True)
    ollama = specs["ollama"]
    assert ollama.argv == ["{binary}", "serve"] and ollama.model_kind == "name"
    assert ollama.env == {"OLLAMA_HOST": "{host}:{port}"} and ollama.health_path == "/api/version"
    assert (ollama.ignore_eos, ollama.min_tokens) == (False, False)
    assert not any(s.allow_args for s in specs.values())


def test_overrides_merge_key_by_key_and_new_engines_are_complete() -> None:
    specs = load_engines({
        "llama.cpp": {"binary": "/opt/llama/bin/llama-server", "startup_timeout_s": 30},
        "mine": {"binary": "my-server", "argv": ["{binary}", "--port", "{port}"]},
    })  # fmt: skip
    llama = specs["llama.cpp"]
    assert llama.binary == "/opt/llama/bin/llama-server" and llama.startup_timeout_s == 30
    assert llama.argv == load_engines()["llama.cpp"].argv  # untouched keys keep the default
    mine = specs["mine"]
    assert (mine.health_path, mine.model_kind, mine.allow_args) == ("/health", "file", False)
    assert get_engine(specs, "mine") is mine
    with pytest.raises(EngineError, match=r"unknown engine 'nope' on this agent \(known: .*mine"):
        get_engine(specs, "nope")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"new": {"binary": "x"}}, "engines.new: field 'argv': required for an engine that KITT does not ship"),
        ({"vllm": {"argv": ["{binary}", "{modle}"]}}, "engines.vllm: field 'argv': argv: unknown placeholder {modle}"),
        ({"vllm": {"argv": ["python", "-m", "x"]}}, "field 'argv': must start with {binary}"),
        ({"vllm": {"startup_timeout": 5}}, "engines.vllm: field 'startup_timeout': unknown key (misspelt?)"),
        ({"vllm": {"startup_timeout_s": -1}}, "field 'startup_timeout_s': Input should be greater than 0"),
        ({"vllm": {"version_regex": "("}}, "field 'version_regex': not a valid regular expression"),
        ({"vllm": {"version_regex": "v.*"}}, "field 'version_regex': needs a capture group"),
        ({"vllm": {"binary": "bin/vllm"}}, "field 'binary': must be a program name found on PATH or an absolute path"),
        ({"vllm": {"health_path": "health"}}, "field 'health_path': must be a URL path starting with /"),
        ({"vllm": {"model_kind": "blob"}}, "field 'model_kind': Input should be 'file', 'dir' or 'name'"),
        ({"vllm": {"env": {"BAD NAME": "x"}}}, "field 'env': 'BAD NAME' is not a valid environment variable name"),
        ({"vllm": {"force_output_len": ["max_tokens"]}}, "field 'force_output_len.0'"),
        ({"vllm": "fast"}, "engines.vllm: expected a mapping of settings, got str"),
        ({"bad name": {}}, "engines: 'bad name' is not a valid engine name"),
    ],
)  # fmt: skip
def test_bad_overrides_name_the_engine_and_field(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_engines(overrides)
    assert message in str(info.value)


def test_agent_yaml_engines_and_models_dir_are_validated(tmp_path: Path) -> None:
    path = tmp_path / "agent.yaml"
    base = {"name": "gpu-01", "server_url": "http://127.0.0.1:8080"}
    path.write_text(yaml.safe_dump({**base, "models_dir": str(tmp_path),
                                    "engines": {"llama.cpp": {"binary": "/opt/llama-server"}}}))  # fmt: skip
    config = load_config(path)
    assert config.models_dir == tmp_path and config.allow_any_model_path is False
    assert load_engines(config.engines)["llama.cpp"].binary == "/opt/llama-server"

    path.write_text(
        yaml.safe_dump({**base, "engines": {"llama.cpp": {"argv": ["{binary}", "{x}"]}}})
    )
    with pytest.raises(ConfigError, match=r"field 'engines': engines.llama.cpp: field 'argv'"):
        load_config(path)
    path.write_text(yaml.safe_dump({**base, "engines": {"llama.cpp": {"bianry": "x"}}}))
    with pytest.raises(ConfigError, match=r"field 'engines.llama.cpp.bianry': unknown key"):
        load_config(path)
    path.write_text(yaml.safe_dump({**base, "models_dir": "models"}))
    with pytest.raises(ConfigError, match=r"field 'models_dir': must be an absolute path"):
        load_config(path)


def test_benchmark_obeys_the_agents_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KITT_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    local = agent_settings()  # no agent.yaml: a local run by the person at the keyboard
    assert (local.overrides, local.models_dir, local.allow_any_model_path) == ({}, tmp_path, True)
    (tmp_path / "agent.yaml").write_text(yaml.safe_dump({
        "name": "gpu-01", "server_url": "http://127.0.0.1:8080", "models_dir": "/srv/models",
        "engines": {"vllm": {"allow_args": True}},
    }))  # fmt: skip
    settings = agent_settings()
    assert settings.models_dir == Path("/srv/models") and settings.allow_any_model_path is False
    assert load_engines(settings.overrides)["vllm"].allow_args is True


# --- models --------------------------------------------------------------------------------


def test_model_resolution(model: Path, tmp_path: Path) -> None:
    specs = load_engines()
    llama, vllm, ollama = specs["llama.cpp"], specs["vllm"], specs["ollama"]
    models = model.parent
    (models / "qwen").mkdir()
    outside = tmp_path / "secret.gguf"
    outside.write_bytes(b"x")

    assert resolve_model(llama, "tiny.gguf", models) == str(model)
    assert resolve_model(llama, str(model), models) == str(model)  # absolute, inside
    assert resolve_model(vllm, "qwen", models) == str(models / "qwen")
    assert (
        resolve_model(ollama, "llama3.1:8b-instruct-q4_K_M", None) == "llama3.1:8b-instruct-q4_K_M"
    )
    assert resolve_model(llama, str(outside), models, allow_any_path=True) == str(outside)

    with pytest.raises(EngineError) as info:
        resolve_model(llama, "missing.gguf", models)
    assert str(info.value) == (
        f"model 'missing.gguf' not found on this agent (looked in {models / 'missing.gguf'})"
    )
    with pytest.raises(EngineError, match=r"outside this agent's models folder"):
        resolve_model(llama, "../secret.gguf", models)
    with pytest.raises(EngineError, match=r"outside this agent's models folder"):
        resolve_model(llama, "sub/../../secret.gguf", models)
    with pytest.raises(EngineError, match=r"outside this agent's models folder"):
        resolve_model(llama, str(outside), models)
    with pytest.raises(EngineError, match=r"absolute paths are refused unless"):
        resolve_model(llama, str(model), None)
    with pytest.raises(EngineError, match=r"relative path but this agent has no models_dir"):
        resolve_model(llama, "tiny.gguf", None)
    with pytest.raises(EngineError, match=r"is not a model file, which engine llama.cpp needs"):
        resolve_model(llama, "qwen", models)
    with pytest.raises(EngineError, match=r"is not a model folder, which engine vllm needs"):
        resolve_model(vllm, "tiny.gguf", models)
    for bad in ("--help", "-m", "", " tiny.gguf", "a\nb", "x\x00"):
        with pytest.raises(EngineError, match=r"invalid model"):
            resolve_model(llama, bad, models)
        with pytest.raises(EngineError, match=r"invalid model"):
            resolve_model(ollama, bad, None)


# --- capabilities and versions --------------------------------------------------------------


def write_program(path: Path, script: str) -> Path:
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_available_engines_and_capabilities(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    write_program(
        bin_dir / "llama-server",
        'echo "version: 6000 (1a2b3c4d)" >&2\necho "built with cc for x86_64" >&2',
    )
    (bin_dir / "vllm").write_text("not executable")
    monkeypatch.setenv("PATH", str(bin_dir))  # no python3 either: sglang is not available
    specs = load_engines({
        "passes-check": {"binary": sys.executable, "argv": ["{binary}"],
                         "check_command": ["{binary}", "-c", "raise SystemExit(0)"]},
        "fails-check": {"binary": sys.executable, "argv": ["{binary}"],
                        "check_command": ["{binary}", "-c", "raise SystemExit(1)"]},
    })  # fmt: skip
    names = available_engines(specs)
    assert names == ["llama.cpp", "passes-check"]
    assert capabilities(["lines", "hold"], names) == [
        "hold", "lines", "serving", "engine:llama.cpp", "engine:passes-check"]  # fmt: skip
    assert capabilities([]) == ["serving"]

    # The shipped llama.cpp version rule on llama-server's real output format.
    assert engine_version(specs["llama.cpp"]) == "6000 (1a2b3c4d)"
    assert engine_version(specs["vllm"]) is None  # not installed: unknown, not an error
    no_match = load_engines({"llama.cpp": {"version_regex": r"release (\d+)"}})["llama.cpp"]
    assert engine_version(no_match) is None


# --- engine processes ----------------------------------------------------------------------


@pytest.fixture
def lines() -> list[str]:
    return []


def test_healthy_engine_streams_prefixed_lines_and_stops(model: Path, lines: list[str]) -> None:
    spec = fake_spec("--lines", "3", "--healthy-after", "0.5", "--child")
    with EngineProcess(spec, str(model), model_name="tiny", on_line=lines.append) as engine:
        assert httpx.get(engine.url + "/health").status_code == 200
        described = engine.describe()
        assert described == {"name": "fake", "version": "b4242", "args": engine.argv,
                             "engine_args": [], "managed": True,
                             "model_path": str(model)}  # fmt: skip
        assert str(model) in engine.argv and str(engine.port) in engine.argv
        assert engine.guard_pid is not None and engine.engine_pid is not None
        assert f"[fake] fake engine pid {engine.engine_pid} model={model} extra=[]" in lines
        assert lines[1:4] == ["[fake] log line 0", "[fake] log line 1", "[fake] log line 2"]
        assert f"[fake] listening on 127.0.0.1:{engine.port}" in lines
        (child,) = pids_in(lines, "child pid")
        pids = [engine.guard_pid, engine.engine_pid, child]
        assert not any(gone(p) for p in pids)
        # The engine leads a process group of its own (with its child), apart from ours.
        assert os.getpgid(engine.engine_pid) == engine.engine_pid == os.getpgid(child)
        assert os.getpgid(engine.engine_pid) != os.getpgid(0)
    assert all(gone(p) for p in pids)  # stop() returns once the whole group is gone
    assert "[fake] kitt: stopping the engine (stop requested)" in lines
    assert "[fake] received SIGTERM, shutting down" in lines
    assert engine.returncode == 0
    engine.stop()  # idempotent


def test_model_name_clients_use(model: Path) -> None:
    specs = load_engines()
    assert EngineProcess(specs["llama.cpp"], str(model)).model_name == "tiny.gguf"
    assert EngineProcess(specs["vllm"], "/srv/models/qwen").model_name == "qwen"
    tag = "hf.co/org/repo:Q4_K_M"
    assert EngineProcess(specs["ollama"], tag).model_name == tag  # a tag stays whole
    assert EngineProcess(specs["vllm"], "/m/qwen", model_name="q").model_name == "q"
    with pytest.raises(EngineError, match=r"invalid model '--served-model-name'"):
        EngineProcess(specs["vllm"], "/m/qwen", model_name="--served-model-name")


def test_engine_args_are_refused_unless_allowed_and_never_reach_a_shell(
    model: Path, lines: list[str]
) -> None:
    with pytest.raises(EngineError, match=r"does not accept engine_args on this agent"):
        EngineProcess(fake_spec(), str(model), engine_args=["-c", "4096"])
    args = ["-c", "4096", "a b; touch /tmp/kitt-pwned", "$(id)"]
    spec = fake_spec("--print-env", "FAKE_ADDR", allow_args=True,
                     env={"FAKE_ADDR": "{host}:{port}"})  # fmt: skip
    with EngineProcess(spec, str(model), on_line=lines.append, engine_args=args) as engine:
        assert any(line.endswith(f"extra={json.dumps(args)}") for line in lines)
        assert f"[fake] env FAKE_ADDR=127.0.0.1:{engine.port}" in lines
        assert engine.describe()["engine_args"] == args
        assert engine.describe()["args"][-len(args) :] == args
    assert not Path("/tmp/kitt-pwned").exists()


def test_engine_exiting_early_reports_status_and_last_lines(model: Path, lines: list[str]) -> None:
    spec = fake_spec("--lines", "30", "--never-healthy", "--exit-after", "0.3", "--exit-code", "3",
                     "--child")  # fmt: skip
    engine = EngineProcess(spec, str(model), on_line=lines.append)
    with pytest.raises(EngineError) as info:
        engine.start()
    message = str(info.value)
    assert message.startswith(
        "engine fake exited with status 3 before it became healthy. Last lines:\n"
    )
    assert message.endswith("fatal: giving up with status 3")
    assert "log line 29" in message and "log line 13" in message
    assert "log line 12" not in message  # the last 20 lines only
    assert len(message.splitlines()) == 21
    (child,) = pids_in(lines, "child pid")
    assert gone(child)  # what the engine left behind is killed with it
    assert engine.guard_pid is not None and gone(engine.guard_pid)


def test_engine_never_healthy_times_out_and_is_stopped(model: Path, lines: list[str]) -> None:
    spec = fake_spec("--never-healthy", startup_timeout_s=1.5)
    engine = EngineProcess(spec, str(model), on_line=lines.append)
    started = time.monotonic()
    with pytest.raises(EngineError) as info:
        engine.start()
    assert 1.5 <= time.monotonic() - started < 10
    message = str(info.value)
    assert message.startswith(
        f"engine fake did not become healthy at http://127.0.0.1:{engine.port}/health "
        "within 1.5 s; it was stopped. Last lines:\n"
    )
    assert f"listening on 127.0.0.1:{engine.port}" in message
    assert engine.engine_pid is not None and gone(engine.engine_pid)
    assert engine.guard_pid is not None and gone(engine.guard_pid)


def test_engine_ignoring_sigterm_is_killed_after_the_grace(model: Path, lines: list[str]) -> None:
    engine = EngineProcess(fake_spec("--ignore-term"), str(model), on_line=lines.append,
                           stop_grace_s=1.0)  # fmt: skip
    engine.start()
    pid = engine.engine_pid
    assert pid is not None
    started = time.monotonic()
    engine.stop()
    assert 1.0 <= time.monotonic() - started < 5.0
    assert gone(pid)
    assert engine.returncode == -signal.SIGKILL
    assert "[fake] kitt: engine did not stop within 1 s of SIGTERM; killing it" in lines


def test_child_ignoring_sigterm_is_killed_after_the_engine_exits(
    model: Path, lines: list[str]
) -> None:
    engine = EngineProcess(fake_spec("--child-ignore-term"), str(model), on_line=lines.append,
                           stop_grace_s=1.0)  # fmt: skip
    engine.start()
    (child,) = pids_in(lines, "child pid")
    started = time.monotonic()
    engine.stop()
    assert 1.0 <= time.monotonic() - started < 5.0
    assert engine.returncode == 0  # the engine itself stopped on SIGTERM
    assert gone(child)


def test_port_taken_meanwhile_is_retried_once(
    model: Path, lines: list[str], tmp_path: Path
) -> None:
    marker = tmp_path / "bound-once"
    spec = fake_spec("--fail-bind-once", str(marker))
    with EngineProcess(spec, str(model), on_line=lines.append) as engine:
        assert httpx.get(engine.url + "/health").status_code == 200
        assert f"[fake] listening on 127.0.0.1:{engine.port}" in lines
    assert sum("fake engine pid" in line for line in lines) == 2  # started twice
    assert sum("Address already in use" in line for line in lines) == 1
    assert any("was taken meanwhile; retrying on another port" in line for line in lines)


def test_missing_binary_is_a_clear_error(model: Path) -> None:
    spec = load_engines({"llama.cpp": {"binary": "/nonexistent/llama-server"}})["llama.cpp"]
    with pytest.raises(
        EngineError, match=r"program '/nonexistent/llama-server' not found on this agent"
    ):
        EngineProcess(spec, str(model)).start()


# --- the benchmark process dies or is signalled ---------------------------------------------

BENCHMARK = """
import json, sys, time
from kitt.bench.engines import EngineProcess, install_stop_on_signals, load_engines
entry = json.loads(sys.argv[1])
spec = load_engines({"fake": entry})["fake"]
lines = []
def on_line(line):
    lines.append(line)
    print(line, flush=True)
engine = EngineProcess(spec, sys.argv[2], on_line=on_line)
with engine:
    if sys.argv[3] == "handlers":
        install_stop_on_signals(engine)
    child = [int(l.rsplit(" ", 1)[1]) for l in lines if "child pid" in l][0]
    print("PIDS " + json.dumps([engine.guard_pid, engine.engine_pid, child]), flush=True)
    while True:
        time.sleep(1)
"""


def start_benchmark(model: Path, handlers: bool) -> tuple[subprocess.Popen[str], list[int]]:
    entry = fake_spec("--child").model_dump(exclude={"name"})
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(BENCHMARK), json.dumps(entry), str(model),
         "handlers" if handlers else "none"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("PIDS "):
            return proc, json.loads(line[5:])
    pytest.fail(f"benchmark exited {proc.wait()} before starting its engine")


def test_engine_dies_with_a_sigkilled_benchmark(model: Path) -> None:
    proc, pids = start_benchmark(model, handlers=False)
    try:
        assert not any(gone(p) for p in pids)
        os.killpg(proc.pid, signal.SIGKILL)  # as the job runner's escalation: no code runs
        assert proc.wait(timeout=10) == -signal.SIGKILL
        wait_for(
            lambda: all(gone(p) for p in pids), timeout=15, what="guard, engine and its child to go"
        )
    finally:
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_to_the_benchmark_group_stops_the_engine_first(model: Path) -> None:
    proc, pids = start_benchmark(model, handlers=True)
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # a cancel, as the job runner sends it
        assert proc.wait(timeout=15) == 128 + signal.SIGTERM
        assert all(gone(p) for p in pids)  # stopped before the benchmark exited
        assert proc.stdout is not None
        rest = proc.stdout.read()
        assert "[fake] kitt: stopping the engine (stop requested)" in rest
        assert "[fake] received SIGTERM, shutting down" in rest
    finally:
        for pid in pids:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
