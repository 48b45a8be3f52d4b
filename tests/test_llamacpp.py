"""The real engine for machines without a GPU: the tiny GGUF writer and llama-server.

Tests marked ``engine`` run the real ``llama-server`` built by kitt.bench.llamacpp; they
skip unless the binary is cached or ``KITT_BUILD_ENGINE=1`` allows building it here.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, TokenType

from conftest import free_port, wait_for
from kitt.bench import llamacpp
from kitt.bench.llamacpp import (
    BACKEND_ENV,
    CMAKE_ARGS_ENV,
    CMAKE_FLAGS,
    LLAMA_CPP_PYTHON_VERSION,
    SDIST_ENV,
    BuildToolMissingError,
    EngineBuildError,
    LlamaCppError,
    SourceDownloadError,
    cache_dir,
    cached_binary,
    cmake_flags_for,
    cuda_architectures,
    ensure_llama_server,
    find_llama_server,
    find_nvcc,
    llama_server_version,
    read_build_info,
    resolve_backend,
)
from kitt.bench.tiny_model import (
    CHATML_TEMPLATE,
    MODEL_NAME,
    SPECIAL_TOKENS,
    SUPPRESS_WEIGHT,
    TinyModelError,
    ensure_demo_model,
    vocabulary,
    write_tiny_model,
)

# Building takes minutes on two cores: the first engine test may pay for it.
ENGINE_TIMEOUT_S = 1200


# --- reading a GGUF back ------------------------------------------------------------------


def _field(reader: GGUFReader, key: str) -> Any:
    field = reader.get_field(key)
    assert field is not None, f"missing metadata {key}"
    return field.contents()


def _tensors(reader: GGUFReader) -> dict[str, Any]:
    return {t.name: t for t in reader.tensors}


# --- tiny model writer (no engine needed) ---------------------------------------------------


def test_vocabulary_allows_only_printable_ascii_tokens() -> None:
    tokens, types, merges, allowed = vocabulary()
    assert len(tokens) == len(types) == len(allowed) == 256 + len(merges) + len(SPECIAL_TOKENS)
    assert len(set(tokens)) == len(tokens)
    decode = {ch: b for b, ch in _byte_map().items()}
    for token, kind, ok in zip(tokens, types, allowed, strict=True):
        if token in SPECIAL_TOKENS:
            assert kind == TokenType.CONTROL and not ok
            continue
        assert kind == TokenType.NORMAL
        text = bytes(decode[ch] for ch in token)
        assert ok == all(0x20 <= b <= 0x7E for b in text), token
    assert sum(allowed) == 95 + len(merges)  # printable ASCII bytes + merged tokens
    for merge in merges:  # every merge's result is itself a token
        assert merge.replace(" ", "") in tokens


def _byte_map() -> dict[int, str]:
    from kitt.bench.tiny_model import byte_to_unicode

    mapping = byte_to_unicode()
    assert len(set(mapping.values())) == 256  # reversible
    assert all(ch.isprintable() and not ch.isspace() for ch in mapping.values())
    return mapping


def test_tiny_model_is_a_readable_llama_gguf(tmp_path: Path) -> None:
    path = write_tiny_model(tmp_path / "tiny.gguf", width=64, layers=3, heads=4, context=512)
    reader = GGUFReader(path)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "general.name") == MODEL_NAME
    assert _field(reader, "llama.context_length") == 512
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.block_count") == 3
    assert _field(reader, "llama.feed_forward_length") == 256
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "llama.rope.dimension_count") == 16
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.chat_template") == CHATML_TEMPLATE
    tokens, _, merges, allowed = vocabulary()
    assert _field(reader, "tokenizer.ggml.tokens") == tokens
    assert _field(reader, "tokenizer.ggml.merges") == merges
    assert _field(reader, "tokenizer.ggml.eos_token_id") == tokens.index("<|im_end|>")

    tensors = _tensors(reader)
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output"]
    per_layer += ["ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{name}.weight" for i in range(3) for name in per_layer
    }
    assert set(tensors) == expected
    vocab = len(tokens)
    assert tensors["token_embd.weight"].data.shape == (vocab, 64)
    assert tensors["output.weight"].data.shape == (vocab, 64)
    assert tensors["blk.0.ffn_down.weight"].data.shape == (64, 256)
    assert tensors["blk.0.ffn_up.weight"].data.shape == (256, 64)
    assert all(t.tensor_type == GGMLQuantizationType.F32 for t in tensors.values())

    # The recipe that makes random weights generate exactly max_tokens printable tokens.
    assert np.all(tensors["token_embd.weight"].data[:, 0] == 1.0)
    for i in range(3):
        assert not np.any(tensors[f"blk.{i}.attn_output.weight"].data[0])
        assert not np.any(tensors[f"blk.{i}.ffn_down.weight"].data[0])
        assert np.any(tensors[f"blk.{i}.ffn_down.weight"].data[1])
    out_dim0 = tensors["output.weight"].data[:, 0]
    assert np.all(out_dim0[np.array(allowed)] == 0.0)
    assert np.all(out_dim0[~np.array(allowed)] == SUPPRESS_WEIGHT)


def test_tiny_model_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = write_tiny_model(tmp_path / "a.gguf", seed=7).read_bytes()
    b = write_tiny_model(tmp_path / "b.gguf", seed=7).read_bytes()
    c = write_tiny_model(tmp_path / "c.gguf", seed=8).read_bytes()
    assert a == b
    assert len(a) == len(c) and a != c


def test_f16_model_halves_the_matrices_and_keeps_norms_f32(tmp_path: Path) -> None:
    f32 = write_tiny_model(tmp_path / "f32.gguf", width=64, layers=2)
    f16 = write_tiny_model(tmp_path / "f16.gguf", width=64, layers=2, dtype="f16")
    tensors = _tensors(GGUFReader(f16))
    for name, tensor in tensors.items():
        want = GGMLQuantizationType.F32 if "norm" in name else GGMLQuantizationType.F16
        assert tensor.tensor_type == want, name
    assert 0.45 < f16.stat().st_size / f32.stat().st_size < 0.6
    assert _field(GGUFReader(f16), "general.file_type") == 1  # MOSTLY_F16


def test_write_is_atomic_and_replaces_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "model.gguf"
    target.parent.mkdir()
    target.write_bytes(b"old")
    write_tiny_model(target, width=32, layers=1, heads=2)
    assert target.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.gguf"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"dtype": "q4"}, "dtype must be one of f32, f16"),
        ({"width": 100, "heads": 3}, "must split into 3 heads"),
        ({"width": 24, "heads": 8}, "of an even size"),
        ({"layers": 0}, "layers >= 1"),
        ({"context": 4}, "context >= 16"),
    ],
)
def test_bad_model_parameters_are_clear_errors(
    tmp_path: Path, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(TinyModelError, match=re.escape(message)):
        write_tiny_model(tmp_path / "x.gguf", **params)
    assert not list(tmp_path.iterdir())


def test_demo_model_is_cached_by_parameters(tmp_path: Path) -> None:
    first = ensure_demo_model(tmp_path, width=32, layers=1, heads=2)
    stamp = first.stat().st_mtime_ns
    again = ensure_demo_model(tmp_path, width=32, layers=1, heads=2)
    assert again == first and again.stat().st_mtime_ns == stamp
    other = ensure_demo_model(tmp_path, width=32, layers=1, heads=2, seed=1)
    assert other != first and other.parent == first.parent == tmp_path / "models"
    assert _field(GGUFReader(other), "llama.embedding_length") == 32
    with pytest.raises(TinyModelError, match="unknown model parameter"):
        ensure_demo_model(tmp_path, depth=3)


# --- llama.cpp build helpers (no engine needed) ---------------------------------------------


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(BACKEND_ENV, "cpu")
    monkeypatch.delenv("KITT_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_dir() == Path.home() / ".cache" / "kitt"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "kitt"
    monkeypatch.setenv("KITT_CACHE_DIR", str(tmp_path / "kc"))
    assert cache_dir() == tmp_path / "kc"
    assert (
        cached_binary() == tmp_path / "kc" / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION / "llama-server"
    )


def test_find_llama_server_prefers_the_cache_then_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BACKEND_ENV, "cpu")
    monkeypatch.setenv("KITT_CACHE_DIR", str(tmp_path / "cache"))
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    assert find_llama_server() is None
    on_path = bindir / "llama-server"
    on_path.write_text("#!/bin/sh\n")
    on_path.chmod(0o755)
    assert find_llama_server() == on_path
    cached = cached_binary()
    cached.parent.mkdir(parents=True)
    cached.write_text("#!/bin/sh\n")
    cached.chmod(0o755)
    assert find_llama_server() == cached


def test_missing_cmake_is_a_clear_error_before_any_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv(BACKEND_ENV, "cpu")
    with pytest.raises(BuildToolMissingError, match=r"apt-get install cmake g\+\+") as info:
        ensure_llama_server(cache=tmp_path / "cache")
    assert info.value.exit_code == 2
    assert "cmake not found" in str(info.value)
    assert not (
        tmp_path / "cache" / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION / "llama-server"
    ).exists()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake to get past the tool check")
def test_unreachable_package_index_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(BACKEND_ENV, "cpu")
    monkeypatch.delenv(SDIST_ENV, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{free_port()}/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    with pytest.raises(SourceDownloadError, match="cannot download llama-cpp-python") as info:
        ensure_llama_server(cache=tmp_path)
    assert "full build log" in str(info.value)
    assert not cached_binary(cache=tmp_path).exists()
    assert "pip" in (tmp_path / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION / "build.log").read_text()


def test_sdist_extraction_refuses_path_traversal(tmp_path: Path) -> None:
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(payload, arcname="pkg/ok.txt")
        tar.add(payload, arcname="pkg/../../escaped.txt")
    with pytest.raises(EngineBuildError, match=r"cannot extract evil\.tar\.gz"):
        llamacpp._safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "escaped.txt").exists()


def test_extraction_checks_members_itself_without_tar_filters(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Python 3.10 before 3.10.12 has no ``filter="data"``: the manual checks must hold."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    good = tmp_path / "good.tar.gz"
    with tarfile.open(good, "w:gz") as tar:
        tar.add(payload, arcname="pkg/vendor/ok.txt")
    root = llamacpp._safe_extract(good, tmp_path / "good")
    assert (root / "vendor" / "ok.txt").read_text() == "x"
    for name, member in [
        ("abs", tarfile.TarInfo("/tmp/abs.txt")),
        ("dotdot", tarfile.TarInfo("pkg/../../up.txt")),
        ("link", tarfile.TarInfo("pkg/link")),
    ]:
        if name == "link":
            member.type = tarfile.SYMTYPE
            member.linkname = "../../../etc/passwd"
        archive = tmp_path / f"{name}.tar"
        with tarfile.open(archive, "w") as tar:
            if member.issym():
                tar.addfile(member)
            else:
                member.size = 1
                tar.addfile(member, io.BytesIO(b"x"))
        with pytest.raises(EngineBuildError, match="outside"):
            llamacpp._safe_extract(archive, tmp_path / name)


def test_version_of_a_broken_binary_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\necho 'illegal instruction' >&2\nexit 132\n")
    fake.chmod(0o755)
    with pytest.raises(LlamaCppError, match="exited with exit code 132"):
        llama_server_version(fake)
    with pytest.raises(LlamaCppError, match="cannot run"):
        llama_server_version(tmp_path / "missing")


# --- CPU and CUDA builds (no GPU needed: stand-in nvcc and nvidia-smi, a tiny project) ------

needs_cmake = pytest.mark.skipif(
    shutil.which("cmake") is None, reason="needs cmake and a C compiler"
)

# A stand-in for the vendored llama.cpp: a C "llama-server" whose --version also says which
# backend flags cmake configured it with, so a test sees what the real build would get.
FAKE_CMAKE = """cmake_minimum_required(VERSION 3.14)
project(fake_llama C)
option(GGML_CUDA "" OFF)
set(KITT_BACKEND "cpu")
if(GGML_CUDA)
  string(REPLACE ";" "," archs "${CMAKE_CUDA_ARCHITECTURES}")
  set(KITT_BACKEND "cuda ${archs} ${CMAKE_CUDA_COMPILER}")
endif()
add_executable(llama-server main.c)
target_compile_definitions(llama-server PRIVATE KITT_BACKEND="${KITT_BACKEND}")
set_target_properties(llama-server PROPERTIES RUNTIME_OUTPUT_DIRECTORY ${CMAKE_BINARY_DIR}/bin)
"""
FAKE_MAIN = """#include <stdio.h>
int main(void) {
    fprintf(stderr, "version: 1 (build 1, commit abc1234)\\nconfigured: %s\\n", KITT_BACKEND);
    return 0;
}
"""


def _fake_sdist(directory: Path, version: str) -> Path:
    """A llama-cpp-python-shaped sdist holding the tiny project (what KITT_LLAMA_SDIST gets)."""
    top = f"llama_cpp_python-{version}"
    sdist = directory / f"{top}.tar.gz"
    with tarfile.open(sdist, "w:gz") as tar:
        for name, text in (("CMakeLists.txt", FAKE_CMAKE), ("main.c", FAKE_MAIN)):
            data = text.encode()
            member = tarfile.TarInfo(f"{top}/vendor/llama.cpp/{name}")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return sdist


def _script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def _nvidia_smi(bindir: Path, caps: str) -> Path:
    """A stand-in nvidia-smi (a boundary we do not own) that answers only the compute
    capability query, as a driver of these GPUs would."""
    return _script(
        bindir / "nvidia-smi",
        'if [ "$1" = "--query-gpu=compute_cap" ] && [ "$2" = "--format=csv,noheader" ]; then\n'
        f"  printf '{caps}'\nelse\n  echo \"unexpected arguments: $*\" >&2; exit 2\nfi",
    )


def _configured(binary: Path) -> str:
    proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=True)
    return proc.stderr.splitlines()[1].removeprefix("configured: ")


def test_cuda_architectures_come_from_nvidia_smi(tmp_path: Path) -> None:
    smi = _nvidia_smi(tmp_path / "bin", "9.0\\n8.6\\n9.0\\n")
    assert cuda_architectures(str(smi)) == ["86", "90"]
    _nvidia_smi(tmp_path / "bin", "10.0\\n")
    assert cuda_architectures(str(smi)) == ["100"]
    _nvidia_smi(tmp_path / "bin", "[N/A]\\n")  # a driver too old to know compute_cap
    assert cuda_architectures(str(smi)) == []
    failing = _script(tmp_path / "fail" / "nvidia-smi", "echo 'NVIDIA-SMI has failed' >&2; exit 9")
    assert cuda_architectures(str(failing)) == []
    assert cuda_architectures(str(tmp_path / "missing")) == []


def test_find_nvcc_looks_on_path_then_in_cuda_folders(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    fallback = tmp_path / "cuda" / "bin" / "nvcc"
    assert find_nvcc(fallbacks=(fallback,)) is None
    _script(fallback, "exit 0")
    assert find_nvcc(fallbacks=(fallback,)) == fallback
    on_path = _script(tmp_path / "bin" / "nvcc", "exit 0")
    assert find_nvcc(fallbacks=(fallback,)) == on_path


def test_backend_is_asked_else_from_the_environment_else_detected(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    monkeypatch.setenv("PATH", str(bindir))
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    nvcc = tmp_path / "cuda" / "bin" / "nvcc"
    assert resolve_backend(nvcc_fallbacks=(nvcc,)) == "cpu"  # neither nvcc nor a GPU
    _script(nvcc, "exit 0")
    assert resolve_backend(nvcc_fallbacks=(nvcc,)) == "cpu"  # a toolkit, but no GPU listed
    _nvidia_smi(bindir, "9.0\\n")
    assert resolve_backend(nvcc_fallbacks=(nvcc,)) == "cuda"
    assert resolve_backend("cpu", nvcc_fallbacks=(nvcc,)) == "cpu"
    monkeypatch.setenv(BACKEND_ENV, "CPU")
    assert resolve_backend(nvcc_fallbacks=(nvcc,)) == "cpu"
    assert resolve_backend("cuda", nvcc_fallbacks=(nvcc,)) == "cuda"  # the option wins
    assert resolve_backend("auto", nvcc_fallbacks=(nvcc,)) == "cuda"
    monkeypatch.setenv(BACKEND_ENV, "rocm")
    with pytest.raises(LlamaCppError) as info:
        resolve_backend()
    assert str(info.value) == (
        f"unknown llama.cpp backend 'rocm' ({BACKEND_ENV}): use one of auto, cpu, cuda"
    )


def test_cmake_flags_add_cuda_and_its_architectures_only_for_cuda() -> None:
    assert cmake_flags_for("cpu", Path("/x/nvcc"), ["90"]) == list(CMAKE_FLAGS)
    nvcc = Path("/usr/local/cuda/bin/nvcc")
    assert cmake_flags_for("cuda", nvcc, ["90"]) == [
        *CMAKE_FLAGS,
        "-DGGML_CUDA=ON",
        "-DCMAKE_CUDA_ARCHITECTURES=90",
        "-DCMAKE_CUDA_COMPILER=/usr/local/cuda/bin/nvcc",
    ]
    assert "-DCMAKE_CUDA_ARCHITECTURES=86;90" in cmake_flags_for("cuda", nvcc, ["86", "90"])
    assert cmake_flags_for("cuda")[-1] == "-DCMAKE_CUDA_ARCHITECTURES=native"


@needs_cmake
def test_cpu_and_cuda_builds_are_cached_apart_and_labelled(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The real build pipeline (KITT_LLAMA_SDIST, cmake, a compiler) on a tiny project:
    each backend gets its own folder, flags, build info and log; a build whose info names
    another backend is rebuilt, never taken for the one asked for."""
    standins = tmp_path / "standins"
    nvcc = _script(standins / "nvcc", "exit 0")
    _nvidia_smi(standins, "9.0\\n")
    monkeypatch.setenv("PATH", f"{standins}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv(CMAKE_ARGS_ENV, raising=False)
    sdist = _fake_sdist(tmp_path, "9.9.9")
    monkeypatch.setenv(SDIST_ENV, str(sdist))
    cache = tmp_path / "cache"

    lines: list[str] = []
    cuda = ensure_llama_server(version="9.9.9", cache=cache, backend="cuda", log=lines.append)
    assert cuda == cache / "llama.cpp" / "9.9.9-cuda" / "llama-server"
    assert _configured(cuda) == f"cuda 90 {nvcc}"
    info = read_build_info("9.9.9", cache, "cuda")
    assert info is not None
    assert info["backend"] == "cuda" and info["sources"] == str(sdist)
    assert info["cmake_flags"][-3:] == [
        "-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=90", f"-DCMAKE_CUDA_COMPILER={nvcc}",
    ]  # fmt: skip
    build_log = (cuda.parent / "build.log").read_text()
    assert build_log.startswith("backend: cuda (CUDA for architectures 90)\n")
    assert "-DGGML_CUDA=ON" in build_log
    assert f"using the llama-cpp-python 9.9.9 sources at {sdist} ({SDIST_ENV})" in lines
    assert any(line.startswith("built llama-server 1 (build 1, commit abc1234) (CUDA for "
                               "architectures 90) in ") for line in lines)  # fmt: skip

    cpu = ensure_llama_server(version="9.9.9", cache=cache, backend="cpu")
    assert cpu == cache / "llama.cpp" / "9.9.9" / "llama-server"
    assert _configured(cpu) == "cpu"
    assert (read_build_info("9.9.9", cache, "cpu") or {})["backend"] == "cpu"
    assert _configured(cuda) == f"cuda 90 {nvcc}"  # untouched by the CPU build
    # auto on this (stand-in) GPU box finds the CUDA build; asked for cpu, the CPU one.
    assert find_llama_server("9.9.9", cache) == cuda
    assert find_llama_server("9.9.9", cache, "cpu") == cpu

    # A CPU build copied into the CUDA folder runs, but is not what was asked for.
    shutil.copy(cpu, cuda)
    shutil.copy(cpu.parent / "build-info.json", cuda.parent / "build-info.json")
    lines.clear()
    again = ensure_llama_server(version="9.9.9", cache=cache, backend="cuda", log=lines.append)
    assert again == cuda and _configured(cuda) == f"cuda 90 {nvcc}"
    assert f"cached {cuda} is not a working cuda build here: rebuilding" in lines
    assert (read_build_info("9.9.9", cache, "cuda") or {})["backend"] == "cuda"


@needs_cmake
def test_cuda_build_without_a_known_gpu_targets_native(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    standins = tmp_path / "standins"
    nvcc = _script(standins / "nvcc", "exit 0")
    _script(standins / "nvidia-smi", "echo 'Failed to initialize NVML' >&2; exit 9")
    monkeypatch.setenv("PATH", f"{standins}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv(SDIST_ENV, str(_fake_sdist(tmp_path, "9.9.9")))
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    monkeypatch.setenv(CMAKE_ARGS_ENV, "-DGGML_CUDA_FA=OFF '-DKITT_NOTE=two words'")
    binary = ensure_llama_server(version="9.9.9", cache=tmp_path / "cache")
    assert _configured(binary) == f"cuda native {nvcc}"
    assert binary.parent.name == "9.9.9-cuda"
    info = read_build_info("9.9.9", tmp_path / "cache", "cuda") or {}
    assert info["cmake_flags"][-4:] == [
        "-DCMAKE_CUDA_ARCHITECTURES=native", f"-DCMAKE_CUDA_COMPILER={nvcc}",
        "-DGGML_CUDA_FA=OFF", "-DKITT_NOTE=two words",
    ]  # fmt: skip
    assert "-DGGML_CUDA_FA=OFF -DKITT_NOTE=two words\n" in (binary.parent / "build.log").read_text()


@needs_cmake
@pytest.mark.skipif(find_nvcc() is not None, reason="a real nvcc is installed here")
def test_cuda_build_without_nvcc_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(SDIST_ENV, str(_fake_sdist(tmp_path, "9.9.9")))
    with pytest.raises(BuildToolMissingError) as info:
        ensure_llama_server(version="9.9.9", cache=tmp_path / "cache", backend="cuda")
    assert "a CUDA build needs nvcc" in str(info.value)
    assert f"--backend cpu ({BACKEND_ENV}=cpu)" in str(info.value)
    assert info.value.exit_code == 2
    assert not (tmp_path / "cache" / "llama.cpp" / "9.9.9-cuda" / "llama-server").exists()


@needs_cmake
def test_bad_sources_or_flags_are_clear_errors(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(SDIST_ENV, str(tmp_path / "nowhere.tar.gz"))
    with pytest.raises(SourceDownloadError, match=f"{SDIST_ENV}=.*nowhere.tar.gz: no such file"):
        ensure_llama_server(version="9.9.9", cache=tmp_path / "cache", backend="cpu")
    other = _fake_sdist(tmp_path, "1.0.0")
    monkeypatch.setenv(SDIST_ENV, str(other))
    with pytest.raises(SourceDownloadError) as info:
        ensure_llama_server(version="9.9.9", cache=tmp_path / "cache", backend="cpu")
    assert "expected the llama-cpp-python 9.9.9 sdist (llama_cpp_python-9.9.9.tar.gz)" in str(
        info.value
    )
    monkeypatch.setenv(SDIST_ENV, str(_fake_sdist(tmp_path, "9.9.9")))
    monkeypatch.setenv(CMAKE_ARGS_ENV, "-DX='unclosed")
    with pytest.raises(EngineBuildError, match=f"^{CMAKE_ARGS_ENV}: No closing quotation$"):
        ensure_llama_server(version="9.9.9", cache=tmp_path / "cache", backend="cpu")
    assert not (tmp_path / "cache" / "llama.cpp" / "9.9.9" / "llama-server").exists()


@needs_cmake
def test_prepare_demo_builds_for_the_asked_backend(tmp_path: Path) -> None:
    """``kitt bench prepare-demo --backend cuda`` as a user runs it (offline sources)."""
    standins = tmp_path / "standins"
    _script(standins / "nvcc", "exit 0")
    _nvidia_smi(standins, "9.0\\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("KITT_")}
    env.update(
        PATH=f"{standins}{os.pathsep}{os.environ['PATH']}", KITT_CACHE_DIR=str(tmp_path / "c"),
        KITT_HOME=str(tmp_path / "home"), COLUMNS="200", NO_COLOR="1",
        KITT_LLAMA_SDIST=str(_fake_sdist(tmp_path, LLAMA_CPP_PYTHON_VERSION)),
    )  # fmt: skip

    def prepare(*args: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kitt", "bench", "prepare-demo", *args],
            env={**env, **extra}, capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip

    done = prepare("--backend", "cuda")
    assert done.returncode == 0, done.stdout + done.stderr
    cuda_dir = tmp_path / "c" / "llama.cpp" / f"{LLAMA_CPP_PYTHON_VERSION}-cuda"
    assert f"building llama-server (cuda) into {cuda_dir}" in done.stdout
    assert "configuring llama.cpp (unknown commit) for CUDA for architectures 90" in done.stdout
    assert (
        f"llama-server: {cuda_dir / 'llama-server'} (1 (build 1, commit abc1234); "
        "CUDA for architectures 90)" in done.stdout
    )
    assert "demo model: " in done.stdout
    again = prepare()  # auto on this (stand-in) GPU box: the cached CUDA build, no rebuild
    assert again.returncode == 0 and "building" not in again.stdout, again.stdout
    assert "CUDA for architectures 90)" in again.stdout

    bad = prepare("--backend", "rocm")
    assert bad.returncode == 2 and "Invalid value for '--backend'" in bad.stderr
    bad_env = prepare(KITT_LLAMA_BACKEND="rocm")
    assert bad_env.returncode == 1 and "Traceback" not in bad_env.stderr + bad_env.stdout
    assert f"unknown llama.cpp backend 'rocm' ({BACKEND_ENV})" in bad_env.stderr + bad_env.stdout


# --- the real engine ----------------------------------------------------------------------


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def llama_server(
    llama_server_binary: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("llama")
    model = write_tiny_model(workdir / "tiny.gguf", context=4096)
    port = free_port()
    log = workdir / "server.log"
    argv = [str(llama_server_binary), "-m", str(model), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "-t", "1", "-np", "4", "-c", "4096", "--metrics"]
    with log.open("wb") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}", process, log)
    try:

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"llama-server exited {process.returncode}:\n{log.read_text()}")
            return httpx.get(f"{server.url}/health", timeout=2).status_code == 200

        wait_for(healthy, timeout=60, what="llama-server /health")
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _stream(url: str, body: dict[str, Any]) -> tuple[list[str], dict[str, Any] | None]:
    """POST a streaming request: the non-empty content pieces and the usage chunk."""
    pieces: list[str] = []
    usage: dict[str, Any] | None = None
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url, json=body, timeout=60) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: ") :])
            for choice in chunk.get("choices") or []:
                text = choice.get("text") or (choice.get("delta") or {}).get("content")
                if text:
                    pieces.append(text)
            if chunk.get("usage"):
                usage = chunk["usage"]
    return pieces, usage


@pytest.mark.engine
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_binary_reports_its_version(llama_server_binary: Path) -> None:
    version = llama_server_version(llama_server_binary)
    assert re.fullmatch(r"\S+ \(build \d+, commit [0-9a-f]{7,}\)", version), version


@pytest.mark.engine
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
@pytest.mark.parametrize("max_tokens", [1, 37])
def test_streamed_completion_yields_exactly_max_tokens(
    llama_server: Server, max_tokens: int
) -> None:
    pieces, usage = _stream(
        f"{llama_server.url}/v1/completions",
        {"model": MODEL_NAME, "prompt": "The quick brown fox", "max_tokens": max_tokens},
    )
    assert len(pieces) == max_tokens
    assert all(p.isascii() and p.isprintable() for p in pieces)
    assert usage is not None
    assert usage["completion_tokens"] == max_tokens
    assert usage["prompt_tokens"] >= 4


@pytest.mark.engine
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_streamed_chat_yields_exactly_max_tokens(llama_server: Server) -> None:
    messages = [{"role": "user", "content": "Say something long."}]
    pieces, usage = _stream(
        f"{llama_server.url}/v1/chat/completions",
        {"model": MODEL_NAME, "messages": messages, "max_tokens": 50},
    )
    assert len(pieces) == 50
    assert usage is not None and usage["completion_tokens"] == 50
    # The ChatML template wrapped the message: more prompt tokens than its own text.
    assert usage["prompt_tokens"] > len("Say something long.") // 2


@pytest.mark.engine
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_ignore_eos_and_min_tokens_are_accepted(llama_server: Server) -> None:
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 20}
    pieces, usage = _stream(
        f"{llama_server.url}/v1/completions", {**body, "ignore_eos": True, "min_tokens": 20}
    )
    assert len(pieces) == 20 and usage is not None and usage["completion_tokens"] == 20
    response = httpx.post(f"{llama_server.url}/v1/completions", json=body, timeout=60)
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == 20


@pytest.mark.engine
@pytest.mark.timeout(ENGINE_TIMEOUT_S)
def test_parallel_slots_each_yield_max_tokens_and_metrics_count_them(
    llama_server: Server,
) -> None:
    url = f"{llama_server.url}/v1/completions"

    def one(i: int) -> tuple[list[str], dict[str, Any] | None]:
        return _stream(url, {"model": MODEL_NAME, "prompt": f"request {i}", "max_tokens": 64})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(4)))
    for pieces, usage in results:
        assert len(pieces) == 64 and usage is not None and usage["completion_tokens"] == 64
    metrics = httpx.get(f"{llama_server.url}/metrics", timeout=10).text
    match = re.search(r"^llamacpp:tokens_predicted_total (\d+)", metrics, re.MULTILINE)
    assert match and int(match.group(1)) >= 4 * 64
