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

from meterstream.worker.batching import BACKLOG_WAIT_FACTOR, broker_backlog, take_batches


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


def first_batch_after(stream: FakeStream, backlog: Any, within: float) -> tuple[int, float]:
    """The size of the first batch and how long it took to come."""

    async def run() -> tuple[int, float]:
        started = time.monotonic()
        async for batch in take_batches(stream, 100, within, backlog):
            stream.should_stop = True
            return len(batch), time.monotonic() - started
        raise AssertionError("no batch")

    return asyncio.run(run())


def test_a_batch_goes_on_filling_while_the_broker_holds_enough_to_fill_it() -> None:
    # 1 event per 2 ms: a 0.1 s timeout takes ~45; the broker holds the rest already
    stream = FakeStream(list(range(300)), per_event_s=0.002)
    size, waited = first_batch_after(stream, lambda evs: 300 - len(evs), within=0.1)
    assert size == 100  # full, past the 0.1 s timeout
    assert 0.1 < waited < 0.4  # and never longer than BACKLOG_WAIT_FACTOR x within


def test_a_batch_closes_at_within_when_the_broker_holds_too_little() -> None:
    stream = FakeStream(list(range(300)), per_event_s=0.002)
    size, waited = first_batch_after(stream, lambda evs: 50, within=0.1)
    assert size < 100
    assert waited < 0.2


def test_waiting_for_the_backlog_is_bounded() -> None:
    # the broker claims a backlog the stream delivers too slowly to fill the batch
    stream = FakeStream(list(range(300)), per_event_s=0.02)
    size, waited = first_batch_after(stream, lambda evs: 10_000, within=0.05)
    assert size < 100
    assert waited < 0.05 * BACKLOG_WAIT_FACTOR + 0.1


def test_broker_backlog_counts_records_behind_the_last_event_of_each_partition() -> None:
    class Message:
        def __init__(self, tp: str, offset: int) -> None:
            self.tp, self.offset = tp, offset

    class Event:
        def __init__(self, tp: str, offset: int) -> None:
            self.message = Message(tp, offset)

    class App:
        class consumer:  # the attribute name of a Faust app
            @staticmethod
            def highwater(tp: str) -> int | None:
                return {"p0": 10, "p1": 5}.get(tp)

    behind = broker_backlog(App())
    events = [Event("p0", 3), Event("p1", 4), Event("p0", 6), Event("p2", 0)]
    # p0: 10 - 7 = 3; p1: 5 - 5 = 0; p2: no high watermark known yet, 0
    assert behind(events) == 3  # type: ignore[arg-type]
