"""A stand-in inference engine process for tests/test_engines.py (standard library only).

It behaves like an engine from the outside: logs lines, answers ``/health`` with 503 until
``--healthy-after`` seconds have passed (``--never-healthy``: never), exits early on request
(``--exit-after``), can start a long-lived child to prove that stopping reaches the
engine's whole process group (``--child``), and can ignore SIGTERM (``--ignore-term``,
``--child-ignore-term``) to prove the SIGKILL after the grace period.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

CHILD = """
import signal, sys, time
if sys.argv[1] == "ignore":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def say(text: str) -> None:
    print(text, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--model", default="")
    parser.add_argument("--healthy-after", type=float, default=0.0)
    parser.add_argument("--never-healthy", action="store_true")
    parser.add_argument("--exit-after", type=float, default=None)
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--lines", type=int, default=0)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--child-ignore-term", action="store_true")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--fail-bind-once", type=Path, default=None)
    parser.add_argument("--print-env", action="append", default=[])
    parser.add_argument("--version", action="store_true")
    args, extra = parser.parse_known_args()

    if args.version:
        print("fake-engine version: 4242 (deadbeef)", file=sys.stderr)
        return 0
    started = time.monotonic()
    say(f"fake engine pid {os.getpid()} model={args.model} extra={json.dumps(extra)}")
    for name in args.print_env:
        say(f"env {name}={os.environ.get(name)}")
    for i in range(args.lines):
        say(f"log line {i}")
    if args.fail_bind_once is not None and not args.fail_bind_once.exists():
        args.fail_bind_once.write_text("taken")
        say(f"error: couldn't bind HTTP server socket, port {args.port}: Address already in use")
        return 1
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:

        def on_term(signum: int, frame: object) -> None:
            say("received SIGTERM, shutting down")
            sys.exit(0)

        signal.signal(signal.SIGTERM, on_term)
    if args.child or args.child_ignore_term:
        mode = "ignore" if args.child_ignore_term else "default"
        child = subprocess.Popen([sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE)
        assert child.stdout is not None
        child.stdout.readline()  # its SIGTERM disposition is set: a test may now signal it
        say(f"child pid {child.pid}")

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ready = not args.never_healthy and time.monotonic() - started >= args.healthy_after
            if self.path == "/health" and ready:
                body, status = b'{"status": "ok"}', 200
            elif self.path == "/health":
                body, status = b'{"error": "Loading model"}', 503
            else:
                body, status = b"{}", 404
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *items: object) -> None:
            pass

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    say(f"listening on {args.host}:{args.port}")
    if args.exit_after is not None:
        time.sleep(args.exit_after)
        say(f"fatal: giving up with status {args.exit_code}")
        return int(args.exit_code)
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
