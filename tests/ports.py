"""Free TCP ports for the processes a test starts, safe under parallel test workers.

Asking the kernel for port 0 and passing the number on leaves a gap before the process
binds it; with several pytest-xdist workers on one machine another worker's process, or
any outgoing connection's source port, can take it meanwhile. So ports come from below
the kernel's ephemeral range (which outgoing connections use, and port-0 binds too), a
block of its own per worker, each handed out once per run and checked free first.
"""

from __future__ import annotations

import itertools
import os
import socket

_FIRST = 10_000
_BLOCK = 2_000  # ports per worker: far more than one worker's tests use in a run
_BLOCKS = 11  # 10,000-31,999: below the usual ephemeral range (32768-60999)
# Ports browsers refuse to load (Chromium's and Firefox's restricted list), in that range.
_BROWSER_UNSAFE = {10080}


def _worker() -> int:
    """This xdist worker's block (workers past the eleventh share blocks, still checked)."""
    name = os.environ.get("PYTEST_XDIST_WORKER", "gw0")  # "gw3"
    return (int(name[2:]) if name[2:].isdigit() else 0) % _BLOCKS


_candidates = itertools.cycle(range(_FIRST + _worker() * _BLOCK, _FIRST + (_worker() + 1) * _BLOCK))


def free_port() -> int:
    for port in _candidates:
        if port in _BROWSER_UNSAFE:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("unreachable: the cycle never ends")
