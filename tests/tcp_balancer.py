"""A TCP load balancer for tests and benchmarks: what HAProxy in ``mode tcp`` does in the
two-instance deployment (docs/operations.md), small enough to run in-process.

Each client connection goes to the next backend in turn; a backend that refuses the
connection (its instance is down) is skipped, as a balancer's health check would. Bytes
are piped untouched, so TLS (and client certificates) pass through to the instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter


class TcpBalancer:
    def __init__(self, backends: list[tuple[str, int]], connect_timeout: float = 1.0) -> None:
        self.backends = backends
        self.connect_timeout = connect_timeout
        self.connections: Counter[int] = Counter()  # per backend port
        self.port = 0
        self._next = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tcp-balancer", daemon=True)
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> TcpBalancer:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the balancer did not start")
        return self

    def __exit__(self, *_exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(timeout=10)
        self._thread.join(timeout=10)

    async def _shutdown(self) -> None:
        """Close the listener and every piped connection, then stop the loop."""
        assert self._server is not None
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop.call_soon(self._loop.stop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None
        for _ in range(len(self.backends)):
            host, port = self.backends[self._next % len(self.backends)]
            self._next += 1
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                upstream = await asyncio.wait_for(
                    asyncio.open_connection(host, port), self.connect_timeout
                )
                self.connections[port] += 1
                break
        if upstream is None:
            writer.close()
            return
        up_reader, up_writer = upstream
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
