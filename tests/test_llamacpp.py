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
    LLAMA_CPP_PYTHON_VERSION,
    BuildToolMissingError,
    EngineBuildError,
    LlamaCppError,
    SourceDownloadError,
    cache_dir,
    cached_binary,
    ensure_llama_server,
    find_llama_server,
    llama_server_version,
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
