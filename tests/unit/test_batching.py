"""take_batches: batches of at most max_, in order, the next one filled while one is
processed, and acks only for batches whose processing finished.

The stream is a stand-in with the few Faust stream members take_batches uses; the
worker runs it on real Faust streams in every integration and fault test."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from pipeline.batching import take_batches


class FakeStream:
    def __init__(self, values: list[int], *, per_event_s: float = 0.0) -> None:
        self.values = values
        self.per_event_s = per_event_s
        self.enable_acks = True
        self.current_event: Any = None
        self._processors: list[Any] = []
        self.acked: list[int] = []
        self.delivered = 0
        self.should_stop = False
        self.channel = self

    def __aiter__(self) -> FakeStream:
        return self

    def add_processor(self, fn: Any) -> None:
        self._processors.append(fn)

    def _enable_passive(self, _channel: Any) -> None:
        async def drain() -> None:
            for value in self.values:
                await asyncio.sleep(self.per_event_s)
                self.current_event = value
                for fn in self._processors:
                    await fn(value)
                self.delivered += 1

        self.task = asyncio.get_running_loop().create_task(drain())

    async def wait(self, event: asyncio.Event) -> None:
        await event.wait()

    async def wait_for_stopped(self, event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout)

    async def ack(self, event: int) -> bool:
        self.acked.append(event)
        return True


async def collect(stream: FakeStream, max_: int, within: float, work_s: float) -> list[list[int]]:
    batches: list[list[int]] = []
    async for batch in take_batches(stream, max_, within):
        # nothing of this batch or later is acked while it is processed
        assert stream.acked == [v for b in batches for v in b]
        batches.append(list(batch))
        await asyncio.sleep(work_s)
        if sum(map(len, batches)) == len(stream.values):
            stream.should_stop = True
    return batches


def test_batches_are_bounded_ordered_and_acked_after_processing() -> None:
    stream = FakeStream(list(range(25)))
    batches = asyncio.run(collect(stream, max_=10, within=0.05, work_s=0.01))
    assert all(len(b) <= 10 for b in batches)
    assert [v for b in batches for v in b] == list(range(25))
    assert stream.acked == list(range(25))
    assert stream.enable_acks is True and stream._processors == []  # restored


def test_the_next_batch_fills_while_one_is_processed_and_no_further() -> None:
    stream = FakeStream(list(range(40)), per_event_s=0.001)
    during: list[tuple[int, int]] = []  # events delivered at the start and end of processing

    async def run() -> None:
        async for batch in take_batches(stream, 10, 5.0):
            before = stream.delivered
            await asyncio.sleep(0.2)  # enough for the stream to deliver 40 events
            during.append((before, stream.delivered))
            if len(stream.acked) + len(batch) == 40:
                stream.should_stop = True

    started = time.monotonic()
    asyncio.run(run())
    for k, (_, after) in enumerate(during[:-1]):
        # Faust's take_events would deliver nothing here; back-pressure stops the
        # stream once the next batch is full (its 10th event's add waits for the take)
        assert after == 10 * (k + 2) - 1, during
    # every batch but the first was full when the previous was done: no 5 s timeout
    assert time.monotonic() - started < 3.0


def test_a_batch_whose_processing_failed_is_never_acked() -> None:
    stream = FakeStream(list(range(20)))

    async def run() -> None:
        async for _batch in take_batches(stream, 10, 0.05):
            raise RuntimeError("ClickHouse is down")

    with pytest.raises(RuntimeError):
        asyncio.run(run())
    assert stream.acked == []
