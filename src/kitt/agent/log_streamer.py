"""A job's log: numbered lines in a bounded buffer, the whole log on disk, many readers.

The job appends lines (never blocking on readers); each reader pulls at its own pace
from a sequence number. A reader that fell so far behind that its next line has left
the in-memory buffer is told so with a ``gap`` (how many lines, which range) and then
catches up from the on-disk copy, so even a stalled dashboard tab neither slows the
benchmark nor silently misses lines.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MAX_LINE_CHARS = 8192  # longer lines are split into several, never dropped
DEFAULT_BUFFER_LINES = 10_000
FLUSH_EVERY_S = 0.1


@dataclass(frozen=True, slots=True)
class LogLine:
    seq: int
    ts: str
    line: str

    def as_dict(self) -> dict[str, object]:
        return {"seq": self.seq, "ts": self.ts, "line": self.line}


@dataclass(frozen=True, slots=True)
class Gap:
    """Lines ``first``..``last`` left the buffer before this reader got to them."""

    first: int
    last: int
    recovered: bool


@dataclass(frozen=True, slots=True)
class End:
    status: str


def split_line(raw: bytes) -> list[str]:
    """Decode a captured line as UTF-8 (bad bytes replaced) and cut it into bounded pieces."""
    text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
    if len(text) <= MAX_LINE_CHARS:
        return [text]
    return [text[i : i + MAX_LINE_CHARS] for i in range(0, len(text), MAX_LINE_CHARS)]


class JobLog:
    def __init__(self, path: Path, buffer_lines: int = DEFAULT_BUFFER_LINES) -> None:
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._file = open(fd, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self._buffer: deque[LogLine] = deque(maxlen=buffer_lines)
        self._cond = threading.Condition()
        self._next_seq = 1
        self._flushed = time.monotonic()
        self._readers_closed = False
        self.status: str | None = None  # set when the job ended

    def append(self, raw: bytes) -> list[LogLine]:
        ts = datetime.now(timezone.utc).isoformat()
        lines = []
        with self._cond:
            for text in split_line(raw):
                line = LogLine(self._next_seq, ts, text)
                self._next_seq += 1
                self._buffer.append(line)
                self._file.write(json.dumps(line.as_dict()) + "\n")
                lines.append(line)
            now = time.monotonic()
            if now - self._flushed >= FLUSH_EVERY_S:  # bounded loss if the agent is killed
                self._file.flush()
                self._flushed = now
            self._cond.notify_all()
        return lines

    def close_readers(self) -> None:
        """The agent is stopping: end every live reader now (each holds a server thread)."""
        with self._cond:
            self._readers_closed = True
            self._cond.notify_all()

    def finish(self, status: str) -> None:
        with self._cond:
            self.status = status
            self._file.close()
            self._cond.notify_all()

    def flush(self) -> None:
        with self._cond:
            if not self._file.closed:
                self._file.flush()

    def _disk_lines(self, first: int) -> Iterator[LogLine]:
        """Lines from ``first`` to the end of the on-disk log (written before the buffer)."""
        self.flush()  # buffered writes first: the reader wants lines that left memory
        try:
            with open(self.path, encoding="utf-8") as fh:
                for raw in fh:
                    entry = json.loads(raw)
                    if entry["seq"] >= first:
                        yield LogLine(entry["seq"], entry["ts"], entry["line"])
        except (OSError, ValueError):
            return

    def follow(
        self, after: int = 0, keepalive_s: float = 15.0, follow: bool = True
    ) -> Iterator[list[LogLine] | Gap | End | None]:
        """Batches of lines after ``after``, then live ones; ``None`` = nothing new for
        ``keepalive_s``."""
        next_seq = after + 1
        while True:
            with self._cond:
                if next_seq >= self._next_seq and self.status is None and follow:
                    if not self._readers_closed:
                        self._cond.wait(keepalive_s)
                    follow = not self._readers_closed
                oldest = self._buffer[0].seq if self._buffer else self._next_seq
                available = [line for line in self._buffer if line.seq >= next_seq]
                status = self.status
                newest = self._next_seq - 1
            if next_seq < oldest and next_seq <= newest:
                # Catch up from disk in one pass (to its current end), not gap by gap.
                yield Gap(next_seq, oldest - 1, recovered=self.path.exists())
                chunk: list[LogLine] = []
                for line in self._disk_lines(next_seq):
                    chunk.append(line)
                    if len(chunk) >= 1000:
                        yield chunk
                        next_seq = chunk[-1].seq + 1
                        chunk = []
                if chunk:
                    yield chunk
                    next_seq = chunk[-1].seq + 1
                next_seq = max(next_seq, oldest)
                continue
            if available:
                yield available  # as one batch: the reader writes it to the socket at once
                next_seq = available[-1].seq + 1
                continue
            if status is not None or not follow:
                yield End(status or "running")
                return
            yield None


class LogRegistry:
    """The logs of this agent's jobs by command id, kept for readers after the job ends."""

    def __init__(self, keep: int = 20) -> None:
        self._logs: dict[str, JobLog] = {}
        self._lock = threading.Lock()
        self._keep = keep

    def add(self, command_id: str, log: JobLog) -> None:
        with self._lock:
            self._logs[command_id] = log
            while len(self._logs) > self._keep:
                self._logs.pop(next(iter(self._logs)))

    def get(self, command_id: str) -> JobLog | None:
        with self._lock:
            return self._logs.get(command_id)

    def close_readers(self) -> None:
        with self._lock:
            logs = list(self._logs.values())
        for log in logs:
            log.close_readers()
