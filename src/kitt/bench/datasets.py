"""Prompt sources: synthetic prompts of controlled length, or a JSONL / ShareGPT file.

Synthetic prompts are made of common English words that are a single token (with their
leading space) in the BPE vocabularies of the usual model families, drawn with a seeded
generator so two runs (or two machines) send the same prompts. The engine's own
``usage.prompt_tokens`` is what the result reports; the runner can calibrate the words
per token against it first (see ``runner.calibrate``), so ``--input-len`` means tokens of
the model under test, not words.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kitt.errors import KittError

MAX_DATASET_BYTES = 512 * 1024 * 1024
DEFAULT_OUTPUT_LEN = 128  # a file entry without a length: never let generation run unbounded

# Common words; each is one token with its leading space in GPT-2/Llama-3/Qwen-style BPE.
_WORD_TEXT = (
    "the of and to in is was for that on as with by at from his an were are which this be "
    "has had one not but first also new after who two its they been other when there all "
    "time during into school more may years over only year most would world city some "
    "where between later three state such then national used made known under many "
    "university united while part season team these american than film second born south "
    "became states war through being including both before north high however people "
    "family early history album area them series against until since district county name "
    "work life group music following number company several four called played released "
    "career league game government house each based day same won use station club "
    "international town located population general college east found age march end "
    "september began home public church line june river member system place century band "
    "july york january october song august best former british party named held village "
    "show local november took service december built another major within along members "
    "five single due although small old left final large include building served "
    "president received games death february main third set children own order species "
    "park law air published road died book men women army often according education "
    "central country division english top included development french community among "
    "water play side list times near late form original different center power led "
    "students german moved court six land council island "
)
WORDS = tuple(_WORD_TEXT.split())


class DatasetError(KittError):
    """A dataset file is missing or malformed, or length options are impossible."""

    exit_code = 2


@dataclass(frozen=True)
class LengthDist:
    """A token length: fixed, or normal(mean, std) clipped to [min, max]."""

    mean: int
    std: float = 0.0
    min: int | None = None
    max: int | None = None

    def __post_init__(self) -> None:
        lo = self.min if self.min is not None else 1
        hi = self.max if self.max is not None else 1 << 30
        if self.mean < 1 or self.std < 0 or lo < 1 or lo > hi:
            raise DatasetError(
                f"impossible length: mean {self.mean}, std {self.std}, "
                f"min {self.min}, max {self.max} (all must be >= 1, min <= max)"
            )

    def sample(self, rng: random.Random) -> int:
        value = self.mean if self.std == 0 else round(rng.gauss(self.mean, self.std))
        lo = self.min if self.min is not None else 1
        hi = self.max if self.max is not None else 1 << 30
        return max(lo, min(hi, value))

    def as_json(self) -> dict[str, Any]:
        return {"mean": self.mean, "std": self.std, "min": self.min, "max": self.max}


@dataclass(frozen=True)
class RequestSpec:
    """One request to send: the text (or chat messages) and the output length to force."""

    prompt: str
    output_len: int
    input_len: int | None = None  # the length asked for (tokens), when synthetic
    messages: tuple[dict[str, str], ...] | None = None

    def chat_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


class Synthetic:
    """Seeded synthetic prompts: ``input_len`` tokens (times ``words_per_token``) each."""

    def __init__(
        self, input_len: LengthDist, output_len: LengthDist, seed: int = 0,
        words_per_token: float = 1.0, overhead_tokens: int = 0,
    ) -> None:  # fmt: skip
        self.input_len = input_len
        self.output_len = output_len
        self.seed = seed
        self.words_per_token = words_per_token
        self.overhead_tokens = overhead_tokens

    def stream(self, stream: int = 0) -> Iterator[RequestSpec]:
        """An endless seeded sequence; ``stream`` picks an independent one (per step)."""
        rng = random.Random(f"{self.seed}:{stream}")
        while True:
            n_in = self.input_len.sample(rng)
            n_out = self.output_len.sample(rng)
            words = max(1, round((n_in - self.overhead_tokens) * self.words_per_token))
            text = " ".join(rng.choice(WORDS) for _ in range(words))
            yield RequestSpec(prompt=text, output_len=n_out, input_len=n_in)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "synthetic",
            "input_len": self.input_len.as_json(),
            "output_len": self.output_len.as_json(),
            "seed": self.seed,
            "words_per_token": round(self.words_per_token, 4),
            "overhead_tokens": self.overhead_tokens,
        }


class FileDataset:
    """Prompts from a file: JSONL (``{"prompt"}`` or ``{"messages"}``, optional
    ``"output_len"``/``"max_tokens"``) or ShareGPT (a JSON array, or JSONL, of
    ``{"conversations": [{"from": "human", "value"}, {"from": "gpt", "value"}]}``)."""

    def __init__(self, path: Path, output_len: LengthDist | None, seed: int = 0) -> None:
        self.path = path
        self.output_len = output_len
        self.seed = seed
        self.items = _load(path)
        if not self.items:
            raise DatasetError(f"{path}: no usable prompts in the file")

    def stream(self, stream: int = 0) -> Iterator[RequestSpec]:
        """File order, wrapping around; each ``stream`` starts at its own offset so that
        steps do not replay the same prompts (prefix caches would flatter the later ones)."""
        rng = random.Random(f"{self.seed}:{stream}")
        i = (stream * 7919) % len(self.items)
        while True:
            prompt, messages, n_out = self.items[i % len(self.items)]
            i += 1
            if self.output_len is not None:
                n_out = self.output_len.sample(rng)
            yield RequestSpec(prompt=prompt, output_len=n_out or DEFAULT_OUTPUT_LEN,
                              messages=messages)  # fmt: skip

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "file",
            "path": str(self.path),
            "prompts": len(self.items),
            "output_len": self.output_len.as_json() if self.output_len else "from file",
            "seed": self.seed,
        }


Item = tuple[str, "tuple[dict[str, str], ...] | None", "int | None"]


def _load(path: Path) -> list[Item]:
    try:
        size = path.stat().st_size
        if size > MAX_DATASET_BYTES:
            raise DatasetError(f"{path}: {size} bytes; the limit is {MAX_DATASET_BYTES}")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError(f"dataset file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc}") from None
    stripped = text.lstrip()
    rows: list[tuple[int, Any]]
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise DatasetError(f"{path}: not valid JSON: {exc}") from None
        rows = list(enumerate(data, 1))
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except ValueError as exc:
                raise DatasetError(f"{path}, line {lineno}: not valid JSON: {exc}") from None
    return [item for n, row in rows if (item := _item(path, n, row)) is not None]


def _item(path: Path, where: int, row: Any) -> Item | None:
    if not isinstance(row, dict):
        raise DatasetError(f"{path}, entry {where}: expected a JSON object")
    n_out = row.get("output_len", row.get("max_tokens"))
    if n_out is not None and (not isinstance(n_out, int) or isinstance(n_out, bool) or n_out < 1):
        raise DatasetError(f"{path}, entry {where}: output_len must be a positive integer")
    if isinstance(row.get("prompt"), str):
        return row["prompt"], None, n_out
    if isinstance(row.get("messages"), list):
        msgs = row["messages"]
        if not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                   and isinstance(m.get("role"), str) for m in msgs):  # fmt: skip
            raise DatasetError(f"{path}, entry {where}: messages need role and content strings")
        clean = tuple({"role": m["role"], "content": m["content"]} for m in msgs)
        return "\n".join(m["content"] for m in clean), clean, n_out
    turns = row.get("conversations")
    if isinstance(turns, list):
        human = [t.get("value") for t in turns if isinstance(t, dict)
                 and t.get("from") in ("human", "user")]  # fmt: skip
        reply = [t.get("value") for t in turns if isinstance(t, dict)
                 and t.get("from") in ("gpt", "assistant")]  # fmt: skip
        if not human or not isinstance(human[0], str) or not human[0].strip():
            return None  # ShareGPT dumps hold empty conversations: skip, as vLLM does
        if n_out is None and reply and isinstance(reply[0], str):
            n_out = max(1, len(reply[0].split()))
        return human[0], None, n_out
    raise DatasetError(
        f"{path}, entry {where}: expected a 'prompt', 'messages' or 'conversations' field"
    )
