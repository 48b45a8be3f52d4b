"""Logging for the daemons: stderr in the foreground (journald), a rotated 0600 file otherwise."""

from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """Rotation re-creates the file with the umask's mode (often 0644); logs stay 0600."""

    def _open(self):  # type: ignore[no-untyped-def]
        stream = super()._open()
        os.chmod(self.baseFilename, 0o600)
        return stream


def setup_logging(log_file: Path | None, level: str = "INFO") -> None:
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler = logging.StreamHandler()
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.touch(mode=0o600, exist_ok=True)
        os.chmod(log_file, 0o600)
        handler = PrivateRotatingFileHandler(
            log_file, maxBytes=10 * 1024 * 1024, backupCount=5, encoding="utf-8"
        )
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level.upper())
    # httpx logs every request at INFO: a heartbeat every few seconds would drown the log.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
