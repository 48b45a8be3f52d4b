"""A tiny llama-architecture GGUF model generated on the spot, so the demo and the engine
tests run a real engine without downloading any weights.

The weights are random, but shaped so that every request yields exactly ``max_tokens``
printable tokens: residual dimension 0 is held at a constant (embedding column 0 is 1 and
no layer writes to it), and the output rows of end-of-generation, control and
non-printable tokens put a large negative weight on that dimension. Those tokens are never
sampled, so generation never stops early and every streamed token is visible text: token
counts measured by the client match the server's ``usage`` exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kitt.errors import KittError

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

MODEL_NAME = "kitt-tiny"
FORMAT_VERSION = 1
"""Bump when the generated file changes for the same parameters (cache key)."""

DTYPES = ("f32", "f16")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# A few GPT-2 style merges of printable ASCII ("Ġ" is the byte-level space), so the
# tokenizer exercises BPE and not only byte fallback.
MERGES = (
    ("Ġ", "t"),
    ("Ġ", "a"),
    ("h", "e"),
    ("i", "n"),
    ("r", "e"),
    ("o", "n"),
    ("Ġt", "he"),
    ("e", "r"),
    ("Ġ", "s"),
    ("a", "t"),
)
SUPPRESS_WEIGHT = -100.0
"""Output weight on residual dimension 0 for tokens that must never be generated."""
_INIT_STD = 0.02

DEMO_PARAMS: dict[str, Any] = {
    "width": 128,
    "layers": 2,
    "heads": 4,
    "context": 4096,
    "seed": 0,
    "dtype": "f32",
}
"""What ``kitt demo`` runs: fast enough on two busy cores for a concurrency sweep."""


class TinyModelError(KittError):
    """The tiny model cannot be written (bad parameters, missing gguf package, disk)."""


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabs."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def vocabulary() -> tuple[list[str], list[int], list[str], list[bool]]:
    """Tokens, their GGUF types, the merges, and whether each token may be generated.

    Allowed tokens decode to printable ASCII (space included): one complete UTF-8
    character or more, so each streamed chunk carries visible text.
    """
    from gguf import TokenType

    to_char = byte_to_unicode()
    tokens = [to_char[b] for b in range(256)]
    allowed = [0x20 <= b <= 0x7E for b in range(256)]
    for left, right in MERGES:
        tokens.append(left + right)
        allowed.append(True)
    types = [int(TokenType.NORMAL)] * len(tokens)
    for special in SPECIAL_TOKENS:
        tokens.append(special)
        types.append(int(TokenType.CONTROL))
        allowed.append(False)
    merges = [f"{left} {right}" for left, right in MERGES]
    return tokens, types, merges, allowed


def _check_params(width: int, layers: int, heads: int, context: int, dtype: str) -> None:
    if dtype not in DTYPES:
        raise TinyModelError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if layers < 1 or heads < 1 or width < 8 or context < 16:
        raise TinyModelError(
            f"need layers >= 1, heads >= 1, width >= 8, context >= 16 "
            f"(got layers={layers}, heads={heads}, width={width}, context={context})"
        )
    if width % heads or (width // heads) % 2:
        raise TinyModelError(
            f"width {width} must split into {heads} heads of an even size (rotary embedding)"
        )


def write_tiny_model(
    path: Path,
    *,
    width: int = 128,
    layers: int = 2,
    heads: int = 4,
    context: int = 2048,
    seed: int = 0,
    dtype: str = "f32",
) -> Path:
    """Write the model to ``path`` (atomically: a reader never sees half a file).

    The same parameters always give the same bytes.
    """
    _check_params(width, layers, heads, context, dtype)
    try:
        import gguf
        import numpy as np
    except ImportError as exc:  # an optional extra: say how to get it
        raise TinyModelError(
            f"writing the demo model needs the gguf package: pip install 'kitt-fleet[demo]' ({exc})"
        ) from exc

    tokens, types, merges, allowed = vocabulary()
    vocab = len(tokens)
    head_dim = width // heads
    ffn = 4 * width
    rng = np.random.default_rng(seed)
    weight_type = np.float16 if dtype == "f16" else np.float32

    def matrix(rows: int, cols: int) -> npt.NDArray[np.float32]:
        out = rng.standard_normal((rows, cols), dtype=np.float32)
        out *= np.float32(_INIT_STD)
        return out

    def ones(n: int) -> npt.NDArray[np.float32]:
        return np.ones(n, dtype=np.float32)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    writer = gguf.GGUFWriter(staged, arch="llama")
    try:
        writer.add_name(MODEL_NAME)
        writer.add_file_type(
            gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32
        )
        writer.add_context_length(context)
        writer.add_embedding_length(width)
        writer.add_block_count(layers)
        writer.add_feed_forward_length(ffn)
        writer.add_head_count(heads)
        writer.add_head_count_kv(heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(10000.0)
        writer.add_layer_norm_rms_eps(1e-5)
        writer.add_vocab_size(vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_eot_token_id(tokens.index("<|im_end|>"))
        writer.add_add_bos_token(False)
        writer.add_chat_template(CHATML_TEMPLATE)

        # Every token's residual starts with dimension 0 = 1; others are unit-scale noise
        # so the final RMS norm keeps dimension 0 near 1.
        embedding = rng.standard_normal((vocab, width), dtype=np.float32)
        embedding[:, 0] = 1.0
        writer.add_tensor("token_embd.weight", embedding.astype(weight_type))
        for layer in range(layers):
            prefix = f"blk.{layer}"
            attn_out = matrix(width, width)
            attn_out[0, :] = 0.0  # no layer writes to residual dimension 0
            ffn_down = matrix(width, ffn)
            ffn_down[0, :] = 0.0
            tensors = {
                "attn_norm": ones(width),
                "attn_q": matrix(width, width),
                "attn_k": matrix(width, width),
                "attn_v": matrix(width, width),
                "attn_output": attn_out,
                "ffn_norm": ones(width),
                "ffn_gate": matrix(ffn, width),
                "ffn_up": matrix(ffn, width),
                "ffn_down": ffn_down,
            }
            for name, tensor in tensors.items():
                # Norm vectors stay F32 (as llama.cpp's converters write them).
                data = tensor if tensor.ndim == 1 else tensor.astype(weight_type)
                writer.add_tensor(f"{prefix}.{name}.weight", data)
        writer.add_tensor("output_norm.weight", ones(width))
        output = matrix(vocab, width)
        output[:, 0] = np.where(np.array(allowed), 0.0, SUPPRESS_WEIGHT)
        writer.add_tensor("output.weight", output.astype(weight_type))

        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(staged, path)
    except OSError as exc:
        raise TinyModelError(f"cannot write {path}: {exc}") from exc
    finally:
        writer.close()
        staged.unlink(missing_ok=True)
    return path


def demo_model_path(cache: Path, **params: Any) -> Path:
    """Where the model for these parameters is cached: the name is a hash of them."""
    merged = {**DEMO_PARAMS, **params}
    key = json.dumps({"format": FORMAT_VERSION, **merged}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache / "models" / f"{MODEL_NAME}-{merged['width']}x{merged['layers']}-{digest}.gguf"


def ensure_demo_model(cache: Path | None = None, **params: Any) -> Path:
    """Return the cached demo model, writing it first (well under a second at demo size).

    ``params`` override :data:`DEMO_PARAMS` (keyword arguments of :func:`write_tiny_model`).
    """
    if cache is None:
        from kitt.bench.llamacpp import cache_dir

        cache = cache_dir()
    unknown = set(params) - set(DEMO_PARAMS)
    if unknown:
        raise TinyModelError(f"unknown model parameter(s): {', '.join(sorted(unknown))}")
    path = demo_model_path(cache, **params)
    if path.is_file():
        return path
    return write_tiny_model(path, **{**DEMO_PARAMS, **params})
