"""Helpers for the SDK tests: a background aiohttp server and concurrent recording."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

from aiohttp import web

from meterstream.client.sdk import HttpUsageClient
from meterstream.embedded.processes import free_port


class BackgroundApp:
    """An aiohttp application on a loopback port, served by its own thread and loop."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.app = web.Application()
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        self._runner = web.AppRunner(self.app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def start(self) -> Self:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def record_from_threads(client: HttpUsageClient, threads: int, each: int) -> list[str]:
    """``each`` events from each of ``threads`` threads at once; the keys record() returned."""
    keys: list[str] = []
    lock = threading.Lock()

    def work(t: int) -> None:
        mine = [client.record("sdk_call", f"cust-{t}", {"n": i}) for i in range(each)]
        with lock:
            keys.extend(mine)

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return keys
