"""``meterstream run --demo``: send the demo load, show live totals, check the end result.

pipeline/embedded/demo/load.py generates the events and what they must add up to,
pipeline/embedded/demo/ledger.py remembers what earlier runs in the state dir sent, and
pipeline/embedded/demo/report.py compares and draws. Here, in order:

1. Read the demo ledger and resend the events of runs that stopped before the
   record held them all (same idempotency keys: they count once).
2. Send ``HISTORY_EVENTS`` events spread over the last two hours, then ``rate``
   records per second, each new event logged before it is sent. The live screen
   is redrawn in place every 2 s on a terminal; elsewhere it is printed as plain
   lines every 10 s.
3. At ``--duration``, or on Ctrl-C (or SIGTERM), stop sending and wait until the
   record holds every event of the run (a second Ctrl-C stops waiting: the next
   run resends them), then fold the run into the ledger.
4. After Ctrl-C: exit 0. After ``--duration``: wait until the forwarder has
   completed a round that started after the record was complete and after the
   last window that is due had closed (its gauge
   ``meterstream_stripe_last_forward_seconds``), compare the generator's totals
   with ClickHouse and with Stripe, print the summary, exit 1 on any difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TextIO

from aiokafka import AIOKafkaProducer

from meterstream.embedded.demo.ledger import DemoLedger, PendingRun, RunLog
from meterstream.embedded.demo.load import (
    CUSTOMERS,
    KEY_PREFIX,
    RULE_BY_METER,
    DemoLoad,
    Expected,
    Record,
    new_run_id,
)
from meterstream.embedded.demo.report import (
    Check,
    LiveView,
    RunFacts,
    StripeMeter,
    compare,
    fit,
    live_frame,
    round_covering,
    summary_lines,
)
from meterstream.embedded.demo.totals import (
    TOTALS_SQL,
    map_demo_customers,
    period_totals,
    stripe_totals,
)
from meterstream.embedded.harness import sql_rows
from meterstream.embedded.stack import Stack
from meterstream.errors import MeterstreamError
from meterstream.events import canonical_json
from meterstream.meters.config import MetersConfig
from meterstream.meters.windows import month_bounds, period_label
from meterstream.sinks.stripe.payloads import Rounding
from meterstream.topics import USAGE_EVENTS

HISTORY_EVENTS = 2000
RECORD_WAIT_SECONDS = 120.0  # after --duration: the worker catches up
RECORD_WAIT_AFTER_CTRL_C = 60.0  # usually a second; a second Ctrl-C cuts it short
WAIT_FOR_ROUND_SECONDS = 180.0  # beyond two intervals: a first round verifies the whole period
RESEND_MARGIN_MS = 3_600_000  # resend only logs an hour younger than the dedup horizon
TTY_REFRESH_SECONDS = 2.0
PLAIN_REFRESH_SECONDS = 10.0
FORWARD_GAUGE = "meterstream_stripe_last_forward_seconds"


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


async def _to_thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


def _sql_text(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def period_totals_sql(period: str) -> str:
    start, end = month_bounds(period)
    return TOTALS_SQL.format(
        where=f"WHERE toUnixTimestamp64Milli(window_start) >= {start} "
        f"AND toUnixTimestamp64Milli(window_start) < {end}"
    )


def recorded_sql(prefixes: list[str]) -> str:
    """Events of these key prefixes in the record (demo customers only)."""
    customers = ", ".join(_sql_text(c) for c in CUSTOMERS)
    keys = " OR ".join(f"startsWith(idempotency_key, {_sql_text(p)})" for p in prefixes)
    return (
        f"SELECT count() AS n FROM usage_events FINAL "
        f"WHERE customer_id IN ({customers}) AND ({keys})"
    )


def forward_gauges(web_url: str) -> dict[str, float]:
    """meter -> start (epoch s) of its last complete forward round, from /metrics."""
    with urllib.request.urlopen(f"{web_url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith(FORWARD_GAUGE + "{"):
            labels, _, value = line.rpartition(" ")
            meter = labels.split('meter="', 1)[1].split('"', 1)[0]
            out[meter] = float(value)
    return out


class Screen:
    """The live table: redrawn in place on a terminal, plain lines elsewhere."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self.drawn = 0

    @property
    def refresh_seconds(self) -> float:
        return TTY_REFRESH_SECONDS if self.tty else PLAIN_REFRESH_SECONDS

    def draw(self, lines: list[str]) -> None:
        if not self.tty:
            self.out.write("\n".join(lines) + "\n\n")
            self.out.flush()
            return
        size = shutil.get_terminal_size()
        lines = fit(lines, size.columns, size.lines)
        up = f"\x1b[{self.drawn}F" if self.drawn else ""
        self.out.write(up + "".join(line + "\x1b[K\n" for line in lines) + "\x1b[J")
        self.out.flush()
        self.drawn = len(lines)

    def say(self, text: str) -> None:
        """A line below the table (the next draw starts below it)."""
        self.out.write(text + "\n")
        self.out.flush()
        self.drawn = 0


@dataclass
class DemoRun:
    stack: Stack
    meters: MetersConfig
    duration: float | None
    rate: float
    out: TextIO = field(default_factory=lambda: sys.stdout)
    stop_requested: asyncio.Event = field(default_factory=asyncio.Event)
    stop_now: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.web = self.stack.endpoints["web_url"]
        self.stripe_base = self.stack.endpoints["stripe_api_base"]
        self.stripe_meters = {
            m.name: StripeMeter(
                m.stripe.grace_seconds * 1000,
                m.stripe.interval_seconds,
                Rounding(m.stripe.rounding),
            )
            for m in self.meters.meters
            if m.stripe is not None and m.name in RULE_BY_METER
        }
        self.screen = Screen(self.out)
        self.started = time.monotonic()
        self.interrupted = False
        self.resent = 0

    # -- signals ------------------------------------------------------------------

    def _on_signal(self) -> None:
        if self.stop_requested.is_set():
            self.stop_now.set()
        self.interrupted = True
        self.stop_requested.set()

    @contextlib.contextmanager
    def _signals(self) -> Any:
        loop = asyncio.get_running_loop()
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            loop.add_signal_handler(sig, self._on_signal)
        try:
            yield
        finally:
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                signal.signal(sig, handler)

    async def _pause(self, seconds: float, event: asyncio.Event) -> bool:
        """Sleep ``seconds`` unless ``event`` is set first; True if it was."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), seconds)
        return event.is_set()

    # -- the run --------------------------------------------------------------------

    async def run(self) -> int:
        with self._signals():
            return await self._run()

    async def _run(self) -> int:
        now = _now_ms()
        horizon_ms = self.stack.settings.dedup_horizon_seconds * 1000
        try:
            ledger = DemoLedger.load(
                self.stack.state_dir / "demo",
                oldest_resendable_ms=now - horizon_ms + RESEND_MARGIN_MS,
            )
        except (OSError, ValueError) as exc:
            raise MeterstreamError(
                f"the demo cannot read what earlier runs sent ({exc}); to start afresh, "
                f"stop meterstream and remove {self.stack.state_dir}"
            ) from None
        load = DemoLoad(new_run_id(now))
        log = ledger.open_log(load.run_id)
        mine = {load.run_id: Expected()}
        for pending in ledger.pending:
            mine[pending.run_id] = Expected()
            for event in pending.events:
                mine[pending.run_id].add_event(event)
        producer = AIOKafkaProducer(
            bootstrap_servers=self.stack.endpoints["kafka_bootstrap"], acks="all", linger_ms=5
        )
        await producer.start()
        try:
            sent_ok = await self._send_all(producer, ledger.pending, load, log, mine[load.run_id])
        finally:
            log.close()
            await producer.stop()
        if not sent_ok:
            return 1
        recorded = await self._wait_recorded(load, ledger.pending, mine)
        total = sum(e.events for e in mine.values())
        if recorded:
            facts = {run_id: _run_facts(expected) for run_id, expected in mine.items()}
            merged = Expected()
            for expected in mine.values():
                merged.merge(expected)
            ledger.fold(facts, merged, keep_from_ms=_previous_month_start(_now_ms()))
        else:
            for expected in mine.values():
                ledger.expected.merge(expected)
        if self.interrupted:
            if recorded:
                self.screen.say(
                    f"stopped: the record holds all {total:,} events of this run "
                    "(the next run adds to them)"
                )
            else:
                self.screen.say(
                    "stopped before the record held every event of this run:\n"
                    "the next run resends them (same keys: each counts once)"
                )
            return 0
        if not recorded:
            self.screen.say(
                f"the record did not hold all {total:,} events after {RECORD_WAIT_SECONDS:.0f} s\n"
                "(see worker.log); comparing anyway"
            )
        periods = sorted({period_label(start) for e in mine.values() for _, _, start in e.windows})
        return await self._summary(ledger, load, mine, periods, recorded)

    async def _send_all(
        self,
        producer: AIOKafkaProducer,
        pending: list[PendingRun],
        load: DemoLoad,
        log: RunLog,
        expected: Expected,
    ) -> bool:
        topic = self.stack.settings.topic(USAGE_EVENTS.name)

        async def send(records: list[Record]) -> None:
            fresh = [r.event for r in records if r.event is not None]
            log.write(fresh)  # before the broker can have them (pipeline/embedded/demo/ledger.py)
            for event in fresh:
                expected.add_event(event)
            for record in records:
                await producer.send(topic, key=record.key, value=record.value)

        for run in pending:
            for event in run.events:
                record = Record(str(event["customer_id"]).encode(), _encode(event))
                await producer.send(topic, key=record.key, value=record.value)
                self.resent += 1
        await send(load.next_batch(HISTORY_EVENTS, _now_ms(), live=False))
        await producer.flush()
        next_show = 0.0
        while not self.stop_requested.is_set():
            if self.duration is not None and time.monotonic() - self.started >= self.duration:
                break
            self.stack.check_worker()  # a dead worker is restarted; a crash loop raises
            await send(load.next_batch(max(1, int(self.rate / 5)), _now_ms()))
            if time.monotonic() >= next_show:
                next_show = time.monotonic() + self.screen.refresh_seconds
                view = await _to_thread(self._live_view, load)
                self.screen.draw(live_frame(view))
            await self._pause(0.2, self.stop_requested)
        await producer.flush()
        return True

    def _live_view(self, load: DemoLoad) -> LiveView:
        now = _now_ms()
        period = period_label(now)
        view = LiveView(
            run_id=load.run_id,
            elapsed_s=time.monotonic() - self.started,
            rate=self.rate,
            sent=load.produced,
            new=load.new,
            recorded=None,
            period=period,
            clickhouse=None,
            stripe=None,
            stripe_meters=self.stripe_meters,
            forwarded_s={},
            now_ms=now,
            width=shutil.get_terminal_size().columns if self.screen.tty else 80,
        )
        try:
            view.clickhouse = period_totals(sql_rows(self.web, period_totals_sql(period)))
            view.recorded = _count(sql_rows(self.web, recorded_sql([load.key_prefix])))
            view.forwarded_s = forward_gauges(self.web)
        except OSError as exc:
            view.problem = str(exc)
            return view
        with contextlib.suppress(OSError, ValueError, KeyError):
            view.stripe = stripe_totals(self.stripe_base, self.meters, period)
        return view

    async def _wait_recorded(
        self, load: DemoLoad, pending: list[PendingRun], mine: dict[str, Expected]
    ) -> bool:
        """Until the record holds every event this run sent (or the wait is cut short)."""
        prefixes = [load.key_prefix] + [f"{KEY_PREFIX}{run.run_id}-" for run in pending]
        want = sum(e.events for e in mine.values())
        timeout = RECORD_WAIT_AFTER_CTRL_C if self.interrupted else RECORD_WAIT_SECONDS
        if self.interrupted:
            self.screen.say(
                "\nstopping: waiting until the record holds this run's events\n"
                "(Ctrl-C again stops at once; the next run resends what is missing)"
            )
        deadline = time.monotonic() + timeout
        have = 0
        while True:
            try:
                have = _count(await _to_thread(sql_rows, self.web, recorded_sql(prefixes)))
            except OSError:
                have = -1
            if have >= want:
                return True
            self.stack.check_worker()
            if time.monotonic() >= deadline:
                return False
            if await self._pause(1.0, self.stop_now):
                return False

    async def _summary(
        self,
        ledger: DemoLedger,
        load: DemoLoad,
        mine: dict[str, Expected],
        periods: list[str],
        recorded: bool,
    ) -> int:
        stripe = await self._stripe_after(_now_ms(), periods)
        if self.stop_requested.is_set():
            self.screen.say("stopped before the summary (the state dir keeps everything)")
            return 0
        known = dict(ledger.runs)
        if not recorded:
            known.update({run_id: _run_facts(expected) for run_id, expected in mine.items()})
        exit_code = 0 if recorded else 1
        for period in periods:
            check = await self._check(ledger.expected, period, stripe)
            in_period = [f for f in known.values() if period in f.get("periods", ())]
            facts = RunFacts(
                sent=load.produced + self.resent,
                new=load.new,
                resent=self.resent,
                duplicates=load.duplicates,
                conflicts=load.conflicts,
                invalid=load.invalid,
                runs=len(in_period),
                events=sum(int(f.get("events", 0)) for f in in_period),
                recorded=recorded,
                expired=len(ledger.expired),
            )
            self.screen.say("")
            for line in summary_lines(check, facts, self.stripe_meters):
                self.screen.say(line)
            if not check.ok or stripe.fatal:
                exit_code = 1
        return exit_code

    async def _check(self, expected: Expected, period: str, stripe: StripeRead) -> Check:
        """Compare; a ClickHouse difference is read again a few times (windows land
        a moment after the record) before it is reported."""
        bounds = month_bounds(period)
        check = Check(period)
        for attempt in range(5):
            clickhouse = period_totals(
                await _to_thread(sql_rows, self.web, period_totals_sql(period))
            )
            check = compare(
                period,
                bounds,
                expected,
                clickhouse,
                None if stripe.totals is None else stripe.totals[period],
                self.stripe_meters,
                stripe.gauges,
                stripe.unchecked,
            )
            if not check.clickhouse_differences or attempt == 4:
                break
            await asyncio.sleep(2)
        return check

    async def _stripe_after(self, complete_ms: int, periods: list[str]) -> StripeRead:
        """Stripe's totals once a forward round covered everything due (module doc, 4)."""
        if not self.stripe_meters:
            return StripeRead({}, {p: {} for p in periods})
        every = min(s.interval_s for s in self.stripe_meters.values())
        self.screen.say(f"\nwaiting for the forwarder's next round (every {every} s) ...")
        longest = max(s.interval_s for s in self.stripe_meters.values())
        deadline = time.monotonic() + 2 * longest + WAIT_FOR_ROUND_SECONDS

        def covered(gauges: dict[str, float], now_ms: int) -> bool:
            return all(
                meter in gauges
                and gauges[meter] * 1000 >= self._due_from(meter, complete_ms, now_ms)
                for meter in self.stripe_meters
            )

        while True:
            self.stack.check_worker()
            try:
                gauges = await _to_thread(forward_gauges, self.web)
            except OSError as exc:
                restarts = self.stack.restarts
                if restarts is not None and restarts.starting and time.monotonic() < deadline:
                    await asyncio.sleep(1)  # restarting: /metrics answers again soon
                    continue
                return StripeRead(
                    {}, None, f"the worker's /metrics could not be read ({exc})", True
                )
            ready = covered(gauges, _now_ms())
            if self.stop_requested.is_set():
                return StripeRead(gauges, None, "interrupted")
            if not ready and time.monotonic() >= deadline:
                return StripeRead(
                    gauges,
                    None,
                    f"no forward round covered every due window within "
                    f"{2 * longest + WAIT_FOR_ROUND_SECONDS:.0f} s "
                    "(see worker.log)",
                    True,
                )
            if ready:
                try:
                    totals = {
                        p: await _to_thread(stripe_totals, self.stripe_base, self.meters, p)
                        for p in periods
                    }
                except (OSError, ValueError, KeyError) as exc:
                    if self.stack.emulator is None:
                        why = f"{self.stripe_base} is not the emulator; what it holds is not read"
                        return StripeRead(gauges, None, why, False)
                    return StripeRead(gauges, None, f"the emulator could not be read ({exc})", True)
                # A window that became due while Stripe was read may be half-sent: read again.
                if covered(gauges, _now_ms()):
                    return StripeRead(gauges, totals)
            await asyncio.sleep(1)

    def _due_from(self, meter: str, complete_ms: int, now_ms: int) -> int:
        info = self.stripe_meters[meter]
        return round_covering(info, RULE_BY_METER[meter].window_ms, complete_ms, now_ms)


@dataclass
class StripeRead:
    """What the summary knows of Stripe: forward gauges, totals per period, or why not."""

    gauges: dict[str, float]
    totals: dict[str, dict[tuple[str, str], Decimal]] | None
    unchecked: str | None = None
    fatal: bool = False


def _encode(event: dict[str, Any]) -> bytes:
    return canonical_json(event).encode()


def _count(rows: list[dict[str, Any]]) -> int:
    return int(rows[0]["n"]) if rows else 0


def _run_facts(expected: Expected) -> dict[str, Any]:
    starts = [start for _, _, start in expected.windows]
    return {
        "events": expected.events,
        "periods": sorted({period_label(s) for s in starts}),
        "last_ms": max(starts, default=0),
    }


def _previous_month_start(now_ms: int) -> int:
    this_start, _ = month_bounds(period_label(now_ms))
    return month_bounds(period_label(this_start - 1))[0]


async def run_demo(stack: Stack, meters: MetersConfig, duration: float | None, rate: float) -> int:
    await _to_thread(map_demo_customers, stack.settings)  # who pays: the operator's mapping
    return await DemoRun(stack, meters, duration, rate).run()
