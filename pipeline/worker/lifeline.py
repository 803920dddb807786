"""The worker's lifeline: it stops, within a bound, when what it lives for is gone.

Three ways a worker is told to stop, and how long each may take:

- **A signal** (SIGTERM, SIGINT, SIGHUP). The first starts Faust's graceful stop:
  the batch in flight finishes and offsets are committed. Another one while it
  stops ends the process at once (exit code 128 + the signal's number). Faust's
  own handler ignores every signal after the first, and a graceful stop can wait
  forever: its offset commit looks for the group coordinator without end while
  the broker is gone.
- **The supervisor is gone.** A worker started by ``meterstream run`` is told
  the supervisor's pid (``METERSTREAM_SUPERVISOR_PID``). The kernel signals the
  worker when the supervisor dies, however it dies (``PR_SET_PDEATHSIG``, see
  :func:`meterstream.embedded.processes.die_with_parent`), and a thread here also checks
  twice a second that the worker's parent is still that pid (the signal can be
  missed: a supervisor that dies before the child set it up, or that forked
  from a thread that ended). Either way the worker stops gracefully and exits
  after ``PARENT_GONE_GRACE_SECONDS`` at the latest (code ``EXIT_STOP_TIMEOUT``),
  at once if the broker stops answering: an embedded broker went with the
  supervisor, and a graceful stop cannot finish (commit) without one.
  The kernel's signal follows the supervisor's *thread* that forked the worker:
  when a supervisor with several threads is killed, the worker can get it twice,
  first while the parent pid is still the supervisor's (its main thread ended,
  the worker was handed to another of its threads), then when the process is
  gone. The first is an ordinary stop request, the second the supervisor gone.
- **The broker is gone**, in any deployment. The same thread asks the broker for
  metadata every few seconds over its own connection, and every batch the worker
  finishes counts as an answer too (its records came from the broker, which
  acknowledged its writes); with no answer for
  ``METERSTREAM_BROKER_LOST_SECONDS`` since the last one, the worker logs one
  CRITICAL line and exits with ``EXIT_BROKER_LOST`` so that an orchestrator
  restarts it, instead of serving ``/healthz`` and logging connection errors
  forever. An idle worker still gets its answers; a ClickHouse outage does
  not touch the broker (the batch waits and retries, as before).

Exiting without a commit loses nothing: a batch's offsets are committed only
after its events are in the record, and the record insert is idempotent, so what
was not committed is consumed again after the restart and counted once.

The exits are ``os._exit`` from a thread, so they happen even while the event
loop waits on a dead broker or is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NoReturn

log = logging.getLogger("meterstream.worker")

EXIT_BROKER_LOST = 69  # EX_UNAVAILABLE
EXIT_STOP_TIMEOUT = 75  # EX_TEMPFAIL: a bounded stop ran out of time
PARENT_GONE_GRACE_SECONDS = 3.0
PARENT_POLL_SECONDS = 0.5
PARENT_GONE_PROBE_SECONDS = 0.2
REPLAYED = "offsets not committed are consumed again on restart (the record insert is idempotent)"


def hard_exit(code: int, message: str) -> NoReturn:
    """Log ``message`` (CRITICAL) and end the process now, from any thread."""
    log.critical(message)
    for handler in logging.getLogger().handlers:
        with contextlib.suppress(Exception):
            handler.flush()
    os._exit(code)


@dataclass
class ContactClock:
    """When the broker last answered, and whether it has been silent too long."""

    bound: float
    last: float

    def contact(self, now: float) -> None:
        self.last = max(self.last, now)

    def silent_for(self, now: float) -> float:
        return now - self.last

    def lost(self, now: float) -> bool:
        return self.silent_for(now) >= self.bound


def probe_timing(bound: float) -> tuple[float, float]:
    """(seconds between probes, timeout of one probe) for a bound: several probes
    fit in the bound, so one slow answer does not decide."""
    return min(5.0, bound / 6), min(10.0, bound / 3)


class StopControl:
    """Decides what a stop request does: start the graceful stop, or end the process."""

    def __init__(
        self,
        supervisor_pid: int | None,
        grace: float = PARENT_GONE_GRACE_SECONDS,
        getppid: Callable[[], int] = os.getppid,
        exit_now: Callable[[int, str], Any] = hard_exit,
    ) -> None:
        self.supervisor_pid = supervisor_pid
        self.grace = grace
        self._getppid = getppid
        self._exit_now = exit_now
        self._lock = threading.Lock()
        self.stopping = False
        self.parent_handled = False
        self.deadline: threading.Timer | None = None

    def parent_gone(self) -> bool:
        """The worker was started by a supervisor that is no longer its parent."""
        return self.supervisor_pid is not None and self._getppid() != self.supervisor_pid

    def on_signal(self, signum: int) -> bool:
        """A stop signal arrived; True: start the graceful stop now."""
        name = signal.Signals(signum).name
        with self._lock:
            if not self.parent_handled and self.parent_gone():
                # The kernel's signal for the supervisor's death (or a signal that
                # arrived after it): not a second request.
                return self._parent_gone_locked(f"{name} received")
            if self.stopping:
                self._exit_now(
                    128 + signum, f"{name} received again while stopping: exiting now; {REPLAYED}"
                )
                return False
            self.stopping = True
        log.warning(
            "%s received: stopping (the batch in flight finishes, offsets are committed); "
            "send it again to exit at once",
            name,
        )
        return True

    def on_parent_gone(self) -> bool:
        """The parent check saw the supervisor gone; True: start the graceful stop now."""
        with self._lock:
            if self.parent_handled:
                return False
            return self._parent_gone_locked("parent check")

    def _parent_gone_locked(self, how: str) -> bool:
        self.parent_handled = True
        log.error(
            "the supervisor (pid %s) is gone (%s): stopping, and exiting in %.0f s at the latest",
            self.supervisor_pid,
            how,
            self.grace,
        )
        timer = threading.Timer(
            self.grace,
            self._exit_now,
            args=(
                EXIT_STOP_TIMEOUT,
                f"not stopped {self.grace:.0f} s after the supervisor died: exiting now; "
                + REPLAYED,
            ),
        )
        timer.daemon = True
        timer.start()
        self.deadline = timer
        first = not self.stopping
        self.stopping = True
        return first


class BrokerProbe:
    """Asks the broker for one topic's metadata over a connection of its own."""

    def __init__(self, bootstrap: str, topic: str, timeout: float, **options: Any) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.timeout = timeout
        self.options = options
        self._client: Any = None
        self._bootstrapping: asyncio.Lock | None = None

    async def __call__(self) -> bool:
        """True: the broker answered (within ``timeout``)."""
        from aiokafka.errors import KafkaError

        try:
            if self._client is None:
                if self._bootstrapping is None:
                    self._bootstrapping = asyncio.Lock()  # in the loop that probes
                async with self._bootstrapping:  # one client, however many callers
                    if self._client is None:
                        await self._bootstrap()
                        return True
            updated = await asyncio.wait_for(self._client.force_metadata_update(), self.timeout)
            return bool(updated)
        except (KafkaError, OSError):  # TimeoutError is an OSError
            return False
        except Exception:  # a watchdog goes on watching: an odd failure is no answer
            log.warning("the broker probe failed unexpectedly", exc_info=True)
            return False

    async def _bootstrap(self) -> None:
        from aiokafka.client import AIOKafkaClient

        client = AIOKafkaClient(
            bootstrap_servers=self.bootstrap,
            request_timeout_ms=int(self.timeout * 1000),
            **self.options,
        )
        try:
            await asyncio.wait_for(client.bootstrap(), self.timeout)
        except BaseException:
            await client.close()
            raise
        client.add_topic(self.topic)  # metadata for this topic only, not all of them
        self._client = client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class Lifeline(threading.Thread):
    """The thread that watches the supervisor and the broker (see the module docstring)."""

    def __init__(
        self,
        stop: StopControl,
        request_stop: Callable[[], None],
        probe: Callable[[], Any] | None,
        broker_lost_seconds: float,
        describe_broker: str = "",
    ) -> None:
        super().__init__(name="meterstream-lifeline", daemon=True)
        self.stop_control = stop
        self.request_stop = request_stop
        self.probe = probe
        self.interval, _ = probe_timing(broker_lost_seconds)
        self.clock = ContactClock(broker_lost_seconds, time.monotonic())
        self.describe_broker = describe_broker

    def run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        tasks = [asyncio.ensure_future(self._watch_parent())]
        if self.probe is not None:
            tasks.append(asyncio.ensure_future(self._watch_broker()))
        await asyncio.gather(*tasks)

    async def _watch_parent(self) -> None:
        if self.stop_control.supervisor_pid is None:
            return
        while not self.stop_control.parent_gone():
            await asyncio.sleep(PARENT_POLL_SECONDS)
        if self.stop_control.on_parent_gone():
            self.request_stop()
        # The graceful stop cannot finish without a broker (it must commit), and an
        # embedded broker went with the supervisor: then do not wait out the grace.
        while self.probe is not None:
            if not await self.probe():
                hard_exit(
                    EXIT_STOP_TIMEOUT,
                    "the supervisor is gone and the broker does not answer: exiting now; "
                    + REPLAYED,
                )
            await asyncio.sleep(PARENT_GONE_PROBE_SECONDS)

    async def _watch_broker(self) -> None:
        assert self.probe is not None
        clock = self.clock
        while True:
            asked = time.monotonic()
            answered = await self.probe()
            now = time.monotonic()
            log.debug(
                "broker probe %s after %.2f s; last contact %.1f s ago",
                "answered" if answered else "failed",
                now - asked,
                clock.silent_for(now),
            )
            if answered:
                clock.contact(now)
            elif clock.lost(now):
                hard_exit(
                    EXIT_BROKER_LOST,
                    f"lost the Kafka broker {self.describe_broker}: no answer for "
                    f"{clock.silent_for(now):.0f} s (METERSTREAM_BROKER_LOST_SECONDS="
                    f"{clock.bound:g}); exiting with code {EXIT_BROKER_LOST} to be restarted; "
                    + REPLAYED,
                )
            await asyncio.sleep(self.interval)

    def contact(self) -> None:
        """The broker answered the worker itself (a batch fetched and acknowledged):
        a busy broker may be slow to answer the probe, never silent."""
        self.clock.contact(time.monotonic())

    def broker_silent_for(self) -> float:
        """Seconds since the broker last answered (a probe, or a batch)."""
        return self.clock.silent_for(time.monotonic())
