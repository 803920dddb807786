"""The worker's stop rules and the Kafka log rate limit, without processes."""

from __future__ import annotations

import logging
import signal
import threading

from meterstream.logs import RepeatFilter
from meterstream.worker.lifeline import EXIT_STOP_TIMEOUT, ContactClock, StopControl, probe_timing


class Exits:
    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.called = threading.Event()

    def __call__(self, code: int, message: str) -> None:
        self.calls.append((code, message))
        self.called.set()


def test_first_signal_stops_gracefully_and_the_second_exits_at_once() -> None:
    exits = Exits()
    stop = StopControl(None, exit_now=exits)
    assert stop.on_signal(signal.SIGTERM) is True
    assert stop.stopping and not exits.calls
    assert stop.on_signal(signal.SIGINT) is False
    assert exits.calls == [
        (
            128 + signal.SIGINT,
            "SIGINT received again while stopping: exiting now; offsets not committed are "
            "consumed again on restart (the record insert is idempotent)",
        )
    ]


def test_a_worker_without_supervisor_never_sees_it_gone() -> None:
    stop = StopControl(None, getppid=lambda: 1)
    assert not stop.parent_gone()
    assert StopControl(4242, getppid=lambda: 4242).parent_gone() is False
    assert StopControl(4242, getppid=lambda: 1).parent_gone() is True


def test_supervisor_death_signal_is_a_first_request_with_a_deadline() -> None:
    parent = [4242]
    exits = Exits()
    stop = StopControl(4242, grace=0.05, getppid=lambda: parent[0], exit_now=exits)
    parent[0] = 1  # reparented: the supervisor died
    assert stop.on_signal(signal.SIGTERM) is True  # the kernel's PDEATHSIG: not a second one
    assert stop.on_parent_gone() is False  # the parent check, later: already handled
    assert exits.called.wait(5)
    assert exits.calls[0][0] == EXIT_STOP_TIMEOUT
    assert "not stopped 0 s after the supervisor died: exiting now" in exits.calls[0][1]
    # a signal after that is a second request
    stop.on_signal(signal.SIGTERM)
    assert exits.calls[-1][0] == 128 + signal.SIGTERM


def test_supervisor_gone_while_already_stopping_arms_the_deadline_only() -> None:
    parent = [4242]
    exits = Exits()
    stop = StopControl(4242, grace=0.05, getppid=lambda: parent[0], exit_now=exits)
    assert stop.on_signal(signal.SIGTERM) is True  # the supervisor's own stop request
    parent[0] = 1
    assert stop.on_signal(signal.SIGTERM) is False  # PDEATHSIG: the stop already runs
    assert exits.called.wait(5)
    assert [code for code, _ in exits.calls] == [EXIT_STOP_TIMEOUT]


def test_contact_clock() -> None:
    clock = ContactClock(bound=60, last=100.0)
    assert not clock.lost(159.9)
    assert clock.lost(160.0)
    clock.contact(150.0)
    clock.contact(120.0)  # an older answer never moves it back
    assert clock.silent_for(200.0) == 50.0
    assert not clock.lost(209.0)
    interval, timeout = probe_timing(60)
    assert interval * 6 <= 60 and timeout * 3 <= 60 and interval == 5.0
    assert probe_timing(6) == (1.0, 2.0)


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_repeat_filter_shows_a_repeated_kafka_message_once_per_period() -> None:
    now = [0.0]
    flt = RepeatFilter(every=10.0, clock=lambda: now[0])
    template = "Unable connect to node with id %s: %s"
    shown = []
    for i in range(100):  # a second's worth of a dead broker
        now[0] = i / 100
        rec = record("aiokafka", template, 111, "Connect call failed")
        if flt.filter(rec):
            shown.append(rec.getMessage())
    assert shown == ["Unable connect to node with id 111: Connect call failed"]
    now[0] = 10.5
    rec = record("aiokafka", template, 111, "Connect call failed")
    assert flt.filter(rec)
    assert rec.getMessage() == (
        "Unable connect to node with id 111: Connect call failed "
        "(99 more like this in the last 10 s not shown)"
    )
    # another message, another logger of the client: shown
    assert flt.filter(record("aiokafka.consumer.fetcher", "Failed fetch messages from %s", 111))
    assert flt.filter(record("aiokafka", "Unable to update metadata from %s", [111]))


def test_repeat_filter_leaves_other_loggers_and_critical_alone() -> None:
    flt = RepeatFilter(every=10.0, clock=lambda: 0.0)
    for _ in range(3):
        assert flt.filter(record("meterstream.clickhouse", "ClickHouse call failed"))
        assert flt.filter(record("aiokafkaish", "not the client"))
        assert flt.filter(record("aiokafka", "fatal", level=logging.CRITICAL))
