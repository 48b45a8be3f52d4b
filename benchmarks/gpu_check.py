"""The GPU check: what only a machine with an NVIDIA GPU can show (run by gpu_check.sh).

1. NVML telemetry from the real ``pynvml`` in an agent's heartbeats, as the server stores
   them (GPU name, utilisation, memory, temperature, power): ``heartbeats.json``.
2. ``kitt bench prepare-demo --backend cuda`` building llama.cpp's llama-server with CUDA
   (offline: the sources come from ``KITT_LLAMA_SDIST``), started at once because it is
   the long pole; its output goes to ``build.log``, its build info to ``build-info.json``.
3. A ``serving`` test submitted through the server (``kitt test run``) to the agent, which
   starts that llama-server on a generated f16 model big enough to keep the GPU busy; the
   result with its per-step GPU telemetry goes to ``result.json``, the test's log (the
   engine's own lines: layers offloaded, CUDA device) to ``test.log``.
4. If time is left, the same engine through ``kitt bench serve`` directly: ``bench.json``.

Every wait has a deadline inside ``--budget-s``; a failed step is logged and the steps that
still make sense go on. If the build fails or runs out of time, the test runs against the
simulator engine instead, so the fleet path and the result's GPU telemetry are still
shown. The last line of ``check.log`` (and stdout) is a one-line summary.

``--local`` runs the same steps on a machine without a GPU: the cached CPU llama-server,
the stand-in NVML (tests/fake_nvml, set up by gpu_check.sh), a small model, a short profile.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from _harness import Sandbox, free_port

from kitt.bench import llamacpp
from kitt.bench.tiny_model import write_tiny_model

AGENT = "gpu-check"
ENGINE = "llama.cpp"
SIMULATOR = "simulator"
MODEL_FILE = "kitt-gpu-check.gguf"
REPO = Path(__file__).resolve().parent.parent

# Per mode: the generated model, the llama-server slots, the fleet test's profile.
PROFILES: dict[str, dict[str, Any]] = {
    # width 2048 x 12 layers, f16: 1.6 GB of weights (memory-bound decode, a busy GPU).
    "gpu": {"width": 2048, "layers": 12, "heads": 16, "slots": 32,
            "params": {"concurrency": "1,8,32", "duration_s": 12, "input_len": 256,
                       "output_len": 128}},
    "local": {"width": 256, "layers": 2, "heads": 4, "slots": 4,
              "params": {"concurrency": "1,4", "duration_s": 4, "input_len": 64,
                         "output_len": 32}},
}  # fmt: skip
CTX_PER_SLOT = 512  # input + output tokens of one request fit in one slot's context
TEST_RESERVE_S = 100.0  # after the build: agent restart, engine start, 3 x 12 s, margin
DIRECT_MIN_S = 60.0  # left over after the fleet test: enough for the direct run


class Check:
    """The run's clock, its log ($OUT/check.log, also stdout) and the facts for the summary."""

    def __init__(self, out: Path, budget_s: float, t0: float) -> None:
        self.out = out
        self.t0 = t0
        self.end = t0 + budget_s
        self.facts: dict[str, str] = {}
        self._log = (out / "check.log").open("a", encoding="utf-8")

    def left(self) -> float:
        return self.end - time.time()

    def log(self, text: str) -> None:
        line = f"[{time.time() - self.t0:6.1f}s] {text}"
        print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step; a failure is logged (not raised) so that later steps still run."""
        started = time.time()
        self.log(f"== {name}")
        try:
            yield
        except Exception as exc:  # reported; later steps go on
            self.facts.setdefault(name, "FAILED")
            self.log(f"-- {name}: FAILED after {time.time() - started:.1f} s: {exc}")
        else:
            self.log(f"-- {name}: ok in {time.time() - started:.1f} s")

    def save(self, name: str, data: Any) -> None:
        (self.out / name).write_text(json.dumps(data, indent=2, default=str) + "\n")


def kitt(env: dict[str, str], *args: str, timeout: float = 60) -> str:
    """Run ``kitt …`` as a user would; its stdout, or an error with the end of its output."""
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "kitt", *args], env=env, capture_output=True, text=True,
            timeout=max(timeout, 1), check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"`kitt {' '.join(args)}` ran past {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise RuntimeError(f"`kitt {' '.join(args)}` exited {proc.returncode}:\n{tail}")
    return proc.stdout


def wait_until(what: str, deadline: float, probe: Any, interval: float = 0.5) -> Any:
    """Poll ``probe`` until it returns something truthy; RuntimeError at ``deadline``."""
    last: Any = None
    while time.time() < deadline:
        try:
            last = probe()
        except Exception as exc:  # kept for the message
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise RuntimeError(f"timed out waiting for {what}; last: {last!r}"[:2000])


# --- the CUDA toolchain ---------------------------------------------------------------------


def cuda_build_env(check: Check) -> tuple[list[str], list[str], list[str]]:
    """Configure flags for a CUDA install whose cuBLAS or driver library CMake would miss,
    and the folders to put on PATH (nvcc) and LD_LIBRARY_PATH (for the engine).

    Toolkits assembled from NVIDIA's pip wheels (as in GPU images built around PyTorch)
    may keep nvcc or cuBLAS in Python's ``nvidia`` package rather than in the toolkit, and a
    container's driver may bring ``libcuda.so.1`` without the ``libcuda.so`` link.
    """
    bindirs: list[str] = []
    nvcc = llamacpp.find_nvcc()
    if nvcc is None:
        found = _pip_nvidia("*/bin/nvcc")
        if not found:
            raise RuntimeError("no nvcc: not on PATH, in /usr/local/cuda/bin or Python's nvidia")
        nvcc = found[0]
        bindirs.append(str(nvcc.parent))
    dry = subprocess.run([str(nvcc), "--dryrun", "-x", "cu", "-E", os.devnull],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    text = dry.stdout + dry.stderr
    includes = [Path(p) for p in re.findall(r'-I"?([^"\s]+)', text)]
    libdirs = [Path(p) for p in re.findall(r'-L"?([^"\s]+)', text)]
    check.log(f"nvcc {nvcc}: include {[str(p) for p in includes]}, lib {[str(p) for p in libdirs]}")
    args: list[str] = []
    runtime = [str(p) for p in libdirs if p.name != "stubs"]
    headers = _pip_nvidia("*/include/cublas_v2.h")
    if any((d / "cublas_v2.h").is_file() for d in includes):
        check.log("cuBLAS: in the toolkit")
    elif headers:
        include, lib = headers[0].parent, headers[0].parent.parent / "lib"
        check.log(f"cuBLAS: not in the toolkit; from Python's nvidia package: {include}, {lib}")
        args += [f"-DCUDA_cublas_LIBRARY={_versioned(lib, 'libcublas')}",
                 f"-DCUDA_cublasLt_LIBRARY={_versioned(lib, 'libcublasLt')}",
                 f"-DCMAKE_CUDA_FLAGS=-I{include}", f"-DCMAKE_CXX_FLAGS=-I{include}"]  # fmt: skip
        runtime.append(str(lib))
    else:
        check.log("cuBLAS: found neither in the toolkit nor in Python's nvidia package")
    ldconfig = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, check=False)
    driver = re.findall(r"libcuda\.so(\.1)? \(.*x86-64.*\) => (\S+)", ldconfig.stdout)
    if any((d / "libcuda.so").exists() for d in libdirs) or any(not v for v, _ in driver):
        check.log("driver library: libcuda.so is where CMake looks")
    elif driver:
        args.append(f"-DCUDA_cuda_driver_LIBRARY={driver[0][1]}")
        check.log(f"driver library: only {driver[0][1]}; named explicitly")
    else:
        args.append("-DGGML_CUDA_NO_VMM=ON")  # VMM is ggml's one use of libcuda at link time
        check.log("driver library: none found; building without CUDA VMM")
    return args, bindirs, runtime


def _pip_nvidia(pattern: str) -> list[Path]:
    """Files matching ``pattern`` in Python's ``nvidia`` namespace package (pip's CUDA)."""
    spec = importlib.util.find_spec("nvidia")
    roots = (spec.submodule_search_locations or []) if spec else []
    return [path for root in roots for path in sorted(Path(root).glob(pattern))]


def _versioned(lib: Path, name: str) -> Path:
    found = sorted(lib.glob(f"{name}.so*"), key=lambda p: len(p.name))
    if not found:
        raise RuntimeError(f"no {name}.so in {lib}")
    return found[0]


# --- steps -----------------------------------------------------------------------------------


def start_build(check: Check, env: dict[str, str], backend: str) -> subprocess.Popen[bytes]:
    jobs = os.cpu_count() or 1
    check.log(f"kitt bench prepare-demo --backend {backend} ({jobs} jobs) -> build.log; "
              f"{llamacpp.CMAKE_ARGS_ENV}={env.get(llamacpp.CMAKE_ARGS_ENV, '')!r}")  # fmt: skip
    # nice: the server, agent and model writer started meanwhile come first; a session of
    # its own: stop_build() ends cmake, ninja and nvcc with it.
    with (check.out / "build.log").open("wb") as out:
        return subprocess.Popen(
            ["nice", "-n", "5", sys.executable, "-m", "kitt", "bench", "prepare-demo",
             "--backend", backend],
            env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip


def stop_build(build: subprocess.Popen[bytes]) -> None:
    if build.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(build.pid, signal.SIGKILL)
        build.wait()


def build_progress(out: Path) -> str:
    lines = (out / "build.log").read_text(errors="replace").splitlines()
    steps = [line.strip() for line in lines if re.match(r"\s*\[\d+/\d+\]", line)]
    return steps[-1][:100] if steps else (lines[-1][:100] if lines else "(no output yet)")


def engines_config(binary: Path, slots: int) -> dict[str, Any]:
    """agent.yaml's engines: llama-server with one slot per concurrent request, and the
    simulator as the fallback. No -ngl: this llama.cpp offloads every layer by default
    (n_gpu_layers -1 = all, common/common.h); -lv 4 shows libllama's load lines, which
    say so ("offloaded N/N layers to GPU")."""
    argv = ["{binary}", "-m", "{model}", "--host", "{host}", "--port", "{port}",
            "--alias", "{model_name}", "--metrics", "-np", str(slots),
            "-c", str(slots * CTX_PER_SLOT), "-lv", "4"]  # fmt: skip
    simulator = {"binary": sys.executable, "model_kind": "name", "startup_timeout_s": 30,
                 "argv": ["{binary}", "-m", "kitt.bench.simulator", "--host", "{host}",
                          "--port", "{port}", "--model", "{model_name}", "--ttft-ms", "20",
                          "--itl-ms", "5"]}  # fmt: skip
    return {ENGINE: {"binary": str(binary), "argv": argv}, SIMULATOR: simulator}


@contextlib.contextmanager
def fleet_server(work: Path) -> Iterator[Sandbox]:
    """A server in a fresh KITT_HOME under ``work``, on a port it picks itself (a port
    chosen here first could be taken by the time it binds: other work runs here too)."""
    home = work / "home"
    shutil.rmtree(home, ignore_errors=True)
    env = dict(os.environ, KITT_HOME=str(home))
    kitt(env, "server", "start", "--port", "0", "--heartbeat-interval", "1", timeout=90)
    url = json.loads((home / "server" / "endpoint.json").read_text())["url"]
    try:
        yield Sandbox(home, env, int(url.rsplit(":", 1)[1]))
    finally:
        with contextlib.suppress(RuntimeError):
            kitt(env, "server", "stop")


def start_agent(check: Check, box: Sandbox, port: int, config: dict[str, Any]) -> None:
    path = box.home / "agent.yaml"
    if not path.exists():
        kitt(box.env, "agent", "init", "--server", box.url, "--name", AGENT,
             "--bind", "127.0.0.1", "--port", str(port))  # fmt: skip
    data = yaml.safe_load(path.read_text())
    data.update(config)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    kitt(box.env, "agent", "start")
    check.log(f"agent {AGENT} started (engines: {', '.join(data.get('engines') or {})})")


def heartbeats(box: Sandbox) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    with box.user_client() as client:
        agent = client.get(f"/api/v1/agents/{AGENT}")
        beats = client.get(f"/api/v1/agents/{AGENT}/heartbeats", params={"limit": 1000})
    agent.raise_for_status()
    beats.raise_for_status()
    return agent.json(), beats.json()["heartbeats"]


def save_heartbeats(check: Check, box: Sandbox) -> list[dict[str, Any]]:
    agent, beats = heartbeats(box)
    check.save("heartbeats.json", {"agent": agent, "heartbeats": beats})
    return beats


def describe_gpus(beats: list[dict[str, Any]]) -> str:
    """Name, and the range seen of each NVML field, across the heartbeats' GPUs."""
    gpus = [g for b in beats for g in b.get("gpus") or []]
    if not gpus:
        return "no GPU in any heartbeat"
    parts = [str(gpus[-1].get("name"))]
    for key, unit in (("utilization_pct", "%"), ("memory_used_gb", " GB"),
                      ("temperature_c", " C"), ("power_w", " W")):  # fmt: skip
        values = [g[key] for g in gpus if g.get(key) is not None]
        parts.append(f"{key} {min(values):g}-{max(values):g}{unit}" if values else f"{key} n/a")
    return ", ".join(parts)


def run_fleet_test(check: Check, box: Sandbox, engine: str, model: str, params: dict[str, Any],
                   deadline: float) -> dict[str, Any]:  # fmt: skip
    cli = ["test", "run", "--agent", AGENT, "--benchmark", "serving", "--engine", engine,
           "--model", model, "--json"]  # fmt: skip
    for key, value in params.items():
        cli += ["--param", f"{key}={value}"]
    check.log("kitt " + shlex.join(cli))
    test_id = json.loads(kitt(box.env, *cli))["id"]
    check.log(f"test {test_id} submitted")

    def finished() -> dict[str, Any] | None:
        with box.user_client() as client:
            info: dict[str, Any] = client.get(f"/api/v1/tests/{test_id}").json()
        done = info["status"] in ("completed", "failed", "cancelled", "lost")
        return info if done else None

    try:
        info: dict[str, Any] = wait_until(f"test {test_id} to end", deadline, finished, 1.0)
    except RuntimeError:
        with contextlib.suppress(RuntimeError):
            kitt(box.env, "test", "cancel", test_id)
        raise
    finally:
        with contextlib.suppress(RuntimeError):
            (check.out / "test.log").write_text(kitt(box.env, "test", "logs", test_id))
    check.save("result.json", info)
    if info["status"] != "completed":
        raise RuntimeError(f"test {test_id} ended {info['status']}: {info.get('error')}")
    return info["result"]  # type: ignore[no-any-return]


def describe_result(doc: dict[str, Any]) -> str:
    """Per step: output tok/s, and the GPU's mean utilisation, memory and power in it."""
    parts = []
    for step in doc["steps"]:
        metrics, telemetry = step["metrics"], step.get("telemetry") or {}
        text = f"{step['name']}: {metrics.get('output_token_throughput', 0):.0f} tok/s"
        gpus = telemetry.get("gpus") or []
        if telemetry.get("available") and gpus:
            g = gpus[0]
            util, mem, power = (g.get(k) or {} for k in ("utilization_pct", "memory_used_gb",
                                                         "power_w"))  # fmt: skip
            text += (f", GPU util {util.get('mean')}% mem {mem.get('max')} GB "
                     f"power {power.get('mean')} W")  # fmt: skip
        else:
            text += f", GPU telemetry: {telemetry.get('reason', 'none')}"
        parts.append(text)
    return "; ".join(parts)


def offload_line(check: Check) -> str:
    path = check.out / "test.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    found = re.findall(r"offloaded \d+/\d+ layers to GPU", text)
    devices = re.findall(r"using device (CUDA\d+ \([^)]*\))", text)
    buffers = re.findall(r"(CUDA\d+ model buffer size = +[\d.]+ MiB)", text)
    parts = [found[-1] if found else "no offload line", *devices[-1:], *buffers[-1:]]
    return "; ".join(parts)


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--local", action="store_true", help="CPU llama-server, stand-in NVML")
    parser.add_argument("--budget-s", type=float, default=530, help="finish within (from T0)")
    args = parser.parse_args()
    out = Path(os.environ["OUT"])
    t0 = float(os.environ.get("GPU_CHECK_T0") or time.time())
    check = Check(out, args.budget_s, t0)
    mode = "local" if args.local else "gpu"
    profile = PROFILES[mode]
    backend = "cpu" if args.local else "cuda"
    work = Path(os.environ.get("GPU_CHECK_WORK") or Path(tempfile.gettempdir()) / "kitt-gpu-check")
    work.mkdir(parents=True, exist_ok=True)
    os.environ.update(NO_COLOR="1", COLUMNS="160")
    extra: list[str] = []
    if not args.local:
        with check.step("CUDA toolchain"):
            extra, bindirs, libdirs = cuda_build_env(check)
            # Flash-attention kernels are most of a CUDA build's time: without them the
            # build fits the check's budget (llama-server then runs without flash attention).
            extra.append("-DGGML_CUDA_FA=OFF")
            for key, dirs in (("PATH", bindirs), ("LD_LIBRARY_PATH", libdirs)):
                # The build finds nvcc, the engine (under the agent) the CUDA libraries.
                os.environ[key] = os.pathsep.join([*dirs, os.environ.get(key, "")]).strip(":")
    env = dict(os.environ)  # the build's: a fresh cache and the carried sources
    if not args.local:
        env["KITT_CACHE_DIR"] = str(work / "cache")
        env[llamacpp.CMAKE_ARGS_ENV] = shlex.join(extra)
        env[llamacpp.SDIST_ENV] = str(
            REPO / ".whl" / "sdist" / f"llama_cpp_python-{llamacpp.LLAMA_CPP_PYTHON_VERSION}.tar.gz"
        )
    build: subprocess.Popen[bytes] | None = None
    with check.step("start the llama-server build"):
        build = start_build(check, env, backend)
    binary = llamacpp.cached_binary(
        cache=Path(env["KITT_CACHE_DIR"]) if "KITT_CACHE_DIR" in env else None, backend=backend
    )

    try:
        fleet_steps(check, args, profile, work, build, binary)
    except Exception as exc:  # the summary must still come
        said = (getattr(exc, "stdout", None) or "") + (getattr(exc, "stderr", None) or "")
        check.log(f"stopped early: {exc!r} {said[-1500:]}")
    if build is not None:
        stop_build(build)
    summary = " | ".join(f"{k}: {v}" for k, v in check.facts.items())
    engine_used = check.facts.get("test", "").split(":")[0]
    verdict = {ENGINE: "OK", SIMULATOR: "PARTIAL"}.get(engine_used, "INCOMPLETE")
    check.log(f"GPU CHECK {verdict} in {time.time() - t0:.0f} s | {summary}")
    return 0 if verdict == "OK" else 1


def fleet_steps(
    check: Check, args: argparse.Namespace, profile: dict[str, Any], work: Path,
    build: subprocess.Popen[bytes] | None, binary: Path,
) -> None:  # fmt: skip
    """Server, agent and heartbeats while the engine builds; then the tests on it."""
    out, backend = check.out, ("cpu" if args.local else "cuda")
    build_deadline = check.end - TEST_RESERVE_S
    check.log("starting the server (loopback, plain HTTP, heartbeats every second)")
    with fleet_server(work) as box:
        agent_port = free_port()
        models = work / "models"
        engines = engines_config(binary, profile["slots"])
        with check.step("agent with NVML telemetry: 3 heartbeats"):
            start_agent(check, box, agent_port, {"models_dir": str(models), "engines": engines,
                                                 "backoff_max_s": 1})  # fmt: skip
            wait_until("3 heartbeats with a GPU", time.time() + 45,
                       lambda: len([b for b in heartbeats(box)[1] if b.get("gpus")]) >= 3)  # fmt: skip
            beats = save_heartbeats(check, box)
            check.facts["nvml"] = describe_gpus(beats)
            check.log(f"heartbeats: {len(beats)}; {check.facts['nvml']}")

        with check.step("generate the model"):
            started = time.time()
            path = write_tiny_model(models / MODEL_FILE, width=profile["width"],
                                    layers=profile["layers"], heads=profile["heads"],
                                    context=profile["slots"] * CTX_PER_SLOT, dtype="f16")  # fmt: skip
            size = path.stat().st_size / 1e9
            check.facts["model"] = f"{size:.2f} GB f16 in {time.time() - started:.0f} s"
            check.log(f"model {path}: {check.facts['model']}")

        engine = SIMULATOR
        with check.step(f"llama-server build ({backend})"):
            if build is None:
                raise RuntimeError("the build did not start")
            last = 0.0
            while build.poll() is None and time.time() < build_deadline:
                if time.time() - last >= 30:
                    last = time.time()
                    check.log(f"building: {build_progress(out)}")
                time.sleep(1)
            if build.poll() is None:
                stop_build(build)
                check.facts["build"] = f"timed out ({build_progress(out)})"
                raise RuntimeError(f"not done {build_deadline - check.t0:.0f} s in: killed")
            if build.returncode != 0:
                check.facts["build"] = f"failed ({build.returncode})"
                tail = (out / "build.log").read_text(errors="replace").splitlines()[-8:]
                raise RuntimeError(f"exit {build.returncode}:\n" + "\n".join(tail))
            info = json.loads((binary.parent / llamacpp.BUILD_INFO_NAME).read_text())
            check.save("build-info.json", info)
            check.facts["build"] = (f"{info.get('backend')} ({llamacpp.describe_build(info)}) "
                                    f"in {info.get('build_seconds')} s")  # fmt: skip
            check.log(f"built: {check.facts['build']}; {info.get('server_version')}")
            engine = ENGINE

        if engine == ENGINE:
            with check.step("restart the agent with llama-server"):
                kitt(box.env, "agent", "stop")
                start_agent(check, box, agent_port, {})
                wait_until("the agent to offer llama.cpp", time.time() + 30,
                           lambda: f"engine:{ENGINE}" in heartbeats(box)[0]["capabilities"])  # fmt: skip

        model = MODEL_FILE if engine == ENGINE else "sim"
        with check.step(f"serving test through the fleet ({engine})"):
            check.facts["test"] = "FAILED"
            doc = run_fleet_test(check, box, engine, model, profile["params"], check.end - 20)
            check.facts["test"] = f"{engine}: {describe_result(doc)}"
            check.log(check.facts["test"])
            if engine == ENGINE:
                check.facts["offload"] = offload_line(check)
                check.log(check.facts["offload"])

        if engine == ENGINE and check.left() > DIRECT_MIN_S:
            with check.step("kitt bench serve, directly"):
                result = work / "direct.json"
                cli = ["bench", "serve", "--engine", ENGINE, "--model", MODEL_FILE,
                       "--concurrency", str(profile["slots"]), "--duration", "10s",
                       "--input-len", "256", "--output-len", "128", "--no-progress",
                       "-o", str(result)]  # fmt: skip
                check.log("kitt " + shlex.join(cli))
                kitt(box.env, *cli, timeout=check.left() - 15)
                doc = json.loads(result.read_text())
                check.save("bench.json", doc)
                check.facts["direct"] = describe_result(doc)
                check.log(check.facts["direct"])

        with check.step("heartbeats, final"):
            beats = save_heartbeats(check, box)
            check.facts["nvml"] = f"{len(beats)} heartbeats: {describe_gpus(beats)}"
            check.log(check.facts["nvml"])
        with contextlib.suppress(RuntimeError):
            kitt(box.env, "agent", "stop")
        shutil_copy(box.home / "agent.log", out / "agent.log")


def shutil_copy(src: Path, dst: Path) -> None:
    """The end of a log, if it exists (the agent's log explains a failed test)."""
    if src.exists():
        dst.write_text("\n".join(src.read_text(errors="replace").splitlines()[-400:]) + "\n")


if __name__ == "__main__":
    sys.exit(main())
