"""The worker's metrics, kept and rendered by ``prometheus_client``.

Every :class:`Metrics` holds its own ``CollectorRegistry`` (never the process-wide
default): several workers in one process (the tests) each serve their own numbers.
``Metric`` keeps the small API callers use (``inc``/``set`` with labels as keyword
arguments, ``get``, ``total``) over a prometheus_client Counter or Gauge whose label
names are declared here; ``Summary`` and ``Histogram`` wrap theirs the same way.

The three latency histograms measure from an event's Kafka record timestamp (when
the producer or the events API sent it; the record's ``ingested_at``) to:

* ``meterstream_event_to_record_seconds``: its row is in ClickHouse ``usage_events``;
* ``meterstream_event_to_window_seconds``: its meters' windows holding it are in
  ``meter_windows`` (the worker's tables are written right after);
* ``meterstream_event_to_stripe_seconds``: Stripe accepted a meter event carrying it,
  observed once per accepted meter event, from the oldest event recorded for that
  meter and customer since the previous accepted one (:class:`StripeArrivals`).

Each observes only fresh events (accepted now, not duplicates or replays of events
already in the record); a producer clock ahead of the worker's counts as 0.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence

from prometheus_client import CollectorRegistry, disable_created_metrics, generate_latest
from prometheus_client import Counter as _Counter
from prometheus_client import Gauge as _Gauge
from prometheus_client import Histogram as _Histogram
from prometheus_client import Summary as _Summary

# No ``*_created`` series beside every counter, summary and histogram (prometheus_client
# adds them by default): the exposition stays the samples it had before this library, at
# half the size. (A process-wide switch of the library's text output, not of any registry.)
disable_created_metrics()

# Seconds, from a fast local path (a few ms) to a Stripe forward interval, its grace
# and retries (minutes to hours).
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0,
)  # fmt: skip


class Metric:
    """A labelled counter or gauge (``kind``), registered in ``registry``.

    ``labels`` declares its label names. Left out (None), they are the names of the
    first call's labels (a metric written the way this module's hand-written version
    allowed): the metric is registered then, and a later call with other names raises.
    """

    def __init__(
        self,
        name: str,
        help_text: str,
        kind: str,
        labels: Sequence[str] | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if kind not in ("counter", "gauge"):
            raise ValueError(f"{name}: kind must be counter or gauge, not {kind!r}")
        self.name = name
        self.help = help_text
        self.kind = kind
        self.registry = registry if registry is not None else CollectorRegistry()
        # a counter's samples end in _total (prometheus_client adds it where the name lacks it)
        self._sample = name if kind == "gauge" or name.endswith("_total") else f"{name}_total"
        self._lock = threading.Lock()
        self._metric: _Counter | _Gauge | None = None
        self.labelnames: tuple[str, ...] = ()
        if labels is not None:
            self._register(tuple(labels))

    def _register(self, labelnames: tuple[str, ...]) -> _Counter | _Gauge:
        with self._lock:
            if self._metric is None:
                cls = _Counter if self.kind == "counter" else _Gauge
                self.labelnames = labelnames
                self._metric = cls(self.name, self.help, labelnames, registry=self.registry)
            return self._metric

    def _child(self, labels: dict[str, str]) -> _Counter | _Gauge:
        metric = self._metric or self._register(tuple(sorted(labels)))
        return metric.labels(**labels) if self.labelnames else metric

    def inc(self, amount: float = 1, **labels: str) -> None:
        self._child(labels).inc(amount)

    def set(self, value: float, **labels: str) -> None:
        child = self._child(labels)
        if not isinstance(child, _Gauge):
            raise TypeError(f"{self.name} is a counter: it only goes up")
        child.set(value)

    def get(self, **labels: str) -> float:
        """The current value for these labels (0 where never touched)."""
        return self.registry.get_sample_value(self._sample, labels) or 0.0

    def total(self) -> float:
        """The sum over every label set."""
        if self._metric is None:
            return 0.0
        return sum(
            s.value
            for family in self._metric.collect()
            for s in family.samples
            if s.name == self._sample
        )

    def render(self) -> Iterable[str]:
        """This metric alone in the text format, line by line (nothing before first use
        when its label names are left to the first call)."""
        if self._metric is not None:
            yield from generate_latest(self._metric).decode().splitlines()


class Summary:
    """Count and sum of observations (batch sizes, insert seconds), by label."""

    default_buckets: Sequence[float] | None = None
    """Buckets when none are given: none is a summary (count and sum only)."""

    def __init__(
        self,
        name: str,
        help_text: str,
        labels: Sequence[str] = (),
        registry: CollectorRegistry | None = None,
        buckets: Sequence[float] | None = None,
    ) -> None:
        if buckets is None:
            buckets = self.default_buckets
        self.name = name
        self.labelnames = tuple(labels)
        self.registry = registry if registry is not None else CollectorRegistry()
        self._metric: _Summary | _Histogram = (
            _Summary(name, help_text, self.labelnames, registry=self.registry)
            if buckets is None
            else _Histogram(
                name, help_text, self.labelnames, registry=self.registry, buckets=buckets
            )
        )

    def observe(self, value: float, **labels: str) -> None:
        (self._metric.labels(**labels) if self.labelnames else self._metric).observe(value)

    def count(self, **labels: str) -> float:
        return self.registry.get_sample_value(f"{self.name}_count", labels) or 0.0


class Histogram(Summary):
    """Observations counted in buckets (:data:`LATENCY_BUCKETS`), by label."""

    default_buckets = LATENCY_BUCKETS

    def observe_since(self, arrivals_ms: Iterable[int], now_s: float | None = None) -> None:
        """One observation per arrival (epoch ms): seconds from it to ``now_s`` (or now),
        never below 0 (a producer clock ahead of the worker's).

        Counted per batch, not per value: each value's bucket found by bisection and
        each touched bucket (and the sum) incremented once. prometheus_client's
        ``observe`` takes a lock per increment and walks the buckets per value (1.7 us
        a value, two per event on the batch path); the exposition is the same
        (tests/unit/test_metrics.py compares the two)."""
        now = time.time() if now_s is None else now_s
        metric = self._metric
        # the upper bounds as prometheus_client keeps them (sorted, +Inf last)
        bounds: list[float] = getattr(metric, "_upper_bounds", [])
        if self.labelnames or not bounds or not isinstance(metric, _Histogram):
            for arrival in arrivals_ms:
                self.observe(max(0.0, now - arrival / 1000))
            return
        counts = [0] * len(bounds)
        total = 0.0
        for arrival in arrivals_ms:
            seconds = now - arrival / 1000
            if seconds < 0.0:
                seconds = 0.0
            total += seconds
            counts[bisect_left(bounds, seconds)] += 1  # the first bound >= seconds
        if not any(counts):
            return
        buckets = metric._buckets  # prometheus_client's own bucket values
        metric._sum.inc(total)
        for index, n in enumerate(counts):
            if n:
                buckets[index].inc(n)

    def count(self, **labels: str) -> float:
        return self.registry.get_sample_value(f"{self.name}_count", labels) or 0.0


class StripeArrivals:
    """The oldest Kafka timestamp recorded per (meter, customer) and not yet carried to
    Stripe, for ``meterstream_event_to_stripe_seconds``.

    The worker notes what it recorded (:meth:`recorded`); the forwarder, for each
    meter event Stripe accepted, takes the entry (:meth:`delivered`) and observes the
    latency of that oldest event. Bounded: beyond ``limit`` series (customers never
    mapped to Stripe, partitions moved to another worker) new ones are not tracked.
    """

    def __init__(self, histogram: Histogram, limit: int = 100_000) -> None:
        self.histogram = histogram
        self.limit = limit
        self._oldest: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()

    def recorded(self, oldest: dict[tuple[str, str], int]) -> None:
        """``oldest``: (meter, customer) -> the earliest Kafka timestamp (ms) just recorded."""
        with self._lock:
            known = self._oldest
            for key, arrival in oldest.items():
                held = known.get(key)
                if held is None:
                    if len(known) < self.limit:
                        known[key] = arrival
                elif arrival < held:
                    known[key] = arrival

    def delivered(self, meter: str, customers: Iterable[str]) -> None:
        now = time.time()
        with self._lock:
            taken = [self._oldest.pop((meter, c), None) for c in customers]
        self.histogram.observe_since((t for t in taken if t is not None), now)

    def clear(self) -> None:
        """Partitions moved: an entry of a customer another worker now forwards would be
        taken, stale, if its partition came back; start afresh instead (a delivery with
        no entry observes nothing)."""
        with self._lock:
            self._oldest.clear()

    def __len__(self) -> int:
        return len(self._oldest)


class Metrics:
    """Every metric of one worker, in its own registry (:meth:`render` for /metrics)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()

        def counter(name: str, help_text: str, *labels: str) -> Metric:
            return Metric(name, help_text, "counter", labels, registry)

        def gauge(name: str, help_text: str, *labels: str) -> Metric:
            return Metric(name, help_text, "gauge", labels, registry)

        self.events_in = counter("meterstream_events_in_total", "Records read from usage-events")
        self.accepted = counter(
            "meterstream_events_accepted_total", "Events accepted into the record"
        )
        self.duplicates = counter("meterstream_events_duplicate_total", "Exact duplicates dropped")
        self.rejected = counter(
            "meterstream_events_rejected_total", "Events dead-lettered, by reason", "reason"
        )
        self.unmetered = counter(
            "meterstream_events_unmetered_total", "Accepted events matching no meter"
        )
        self.meter_updates = counter(
            "meterstream_meter_updates_total", "Event contributions per meter", "meter"
        )
        self.windows_recomputed = counter(
            "meterstream_windows_recomputed_total", "Window states rebuilt from the record"
        )
        self.window_rebuilds = counter(
            "meterstream_window_rebuilds_total",
            "Window states rebuilt from the record, by reason: absent (the table held no state"
            " and the window was not provably new), uncounted (events in the record that no"
            " table write counted: a batch replayed after a crash), isolation (rewritten after"
            " a batch isolation), correction (a void, amend or backfill; pipeline/worker/"
            "corrections.py)",
            "reason",
        )
        self.corrections = counter(
            "meterstream_corrections_total",
            "Corrections applied (dry runs and repeats not counted), by kind: void, amend,"
            " backfill",
            "kind",
        )
        self.corrected_events = counter(
            "meterstream_corrected_events_total",
            "Events changed by corrections, by action: voided, amended, backfilled (older"
            " than the dedup horizon, counted through the correction path; newer ones are"
            " produced to usage-events and counted as any event)",
            "action",
        )
        self.end_markers = counter(
            "meterstream_changelog_end_markers_total",
            "One-record batches that end a batch's changelog writes per partition"
            " (Pipeline._end_markers; METERSTREAM_CHANGELOG_END_MARKERS)",
        )
        self.windows_new = counter(
            "meterstream_windows_new_total",
            "Windows unknown to the table and provably new (not rebuilt from the record)",
        )
        self.record_lookups = counter(
            "meterstream_record_lookups_total", "Dedup keys unknown to the table, looked up"
        )
        self.record_lookups_skipped = counter(
            "meterstream_record_lookups_skipped_total",
            "Dedup keys unknown to the table and provably fresh (not looked up)",
        )
        self.repairs = counter(
            "meterstream_window_repairs_total",
            "Windows whose total differed from the record",
            "meter",
        )
        self.verify_days = counter(
            "meterstream_verify_days_total",
            "Changed customer-days checked against the record before forwarding, and re-read",
            "meter",
            "result",
        )
        self.sink_batch_rows = Summary(
            "meterstream_sink_batch_rows", "Rows per ClickHouse insert", ("table",), registry
        )
        self.sink_seconds = Summary(
            "meterstream_sink_seconds", "Seconds per ClickHouse insert", ("table",), registry
        )
        self.sink_retries = counter("meterstream_sink_retries_total", "ClickHouse inserts retried")
        self.stripe_requests = counter(
            "meterstream_stripe_requests_total",
            "Stripe meter event requests, by outcome",
            "outcome",
        )
        self.stripe_waiting = gauge(
            "meterstream_stripe_waiting_customers",
            "Customers held back because no Stripe customer id is known yet, by meter",
            "meter",
        )
        self.stripe_last_forward = gauge(
            "meterstream_stripe_last_forward_seconds",
            "Start (epoch seconds) of the last forward of a meter that delivered everything it "
            "planned: every window that had closed grace before it is at Stripe",
            "meter",
        )
        self.stripe_refused = gauge(
            "meterstream_stripe_refused_customers",
            "Customers held back because their events name a refused Stripe customer id",
            "meter",
        )
        self.stripe_refusals = counter(
            "meterstream_stripe_customer_refusals_total",
            "Stripe customer ids named by event properties and refused, by reason",
            "reason",
        )
        self.stripe_uncorrectable = counter(
            "meterstream_stripe_uncorrectable_total",
            "(customer, period) series found wrong at Stripe and no longer correctable "
            "(recorded in stripe_uncorrectable)",
            "meter",
        )
        self.stripe_cancellations = counter(
            "meterstream_stripe_cancellations_total",
            "Superseded `last` meter events cancelled at Stripe, by outcome",
            "outcome",
        )
        self.last_batch = gauge(
            "meterstream_last_batch_seconds",
            "End (epoch seconds) of the last batch of usage-events processed: one that stops "
            "moving while the consumer lag grows is a stuck worker",
        )
        self.consumer_lag = gauge(
            "meterstream_consumer_lag", "Records behind the end, by partition", "partition"
        )
        self.gap_records = counter(
            "meterstream_gap_records_total",
            "Records Faust skipped, read directly by offset and processed",
        )
        self.batch_isolations = counter(
            "meterstream_batch_isolations_total",
            "Batches that raised and were bisected to set the failing records aside",
        )
        self.stripe_held_range = gauge(
            "meterstream_stripe_held_out_of_range",
            "Series held back because their period total does not fit Stripe's whole numbers",
            "meter",
        )
        self.credit_purchases = counter(
            "meterstream_credit_purchases_total",
            "Credit purchases, by outcome: created, succeeded, failed, mismatch",
            "outcome",
        )
        self.stripe_webhooks = counter(
            "meterstream_stripe_webhooks_total",
            "Stripe webhooks received, by result: applied, duplicate, ignored, rejected",
            "result",
        )
        self.api_requests = counter(
            "meterstream_api_requests_total",
            "Web API requests, by route and status",
            "route",
            "status",
        )
        self.api_events = counter(
            "meterstream_api_events_total", "Events written to usage-events by the events API"
        )
        self.sql_queries = counter(
            "meterstream_sql_queries_total",
            "Analyst SQL statements, by outcome (ok, refused, limit, cancelled, busy, error)",
            "outcome",
        )
        self.api_keys_file_ok = gauge(
            "meterstream_api_keys_file_ok",
            "1 while the API keys file reads cleanly; 0 while it is broken and the worker"
            " serves the last good keys",
        )
        self.api_keys_file_errors = counter(
            "meterstream_api_keys_file_errors_total",
            "Versions of the API keys file that could not be read",
        )
        self.table_keys = gauge("meterstream_table_keys", "Keys held in a worker table", "table")
        self.rocksdb_memory = gauge(
            "meterstream_rocksdb_memory_bytes",
            "RocksDB block cache in use, memtables charged to it included, and its capacity",
            "kind",
        )
        self.guarantee = gauge(
            "meterstream_processing_guarantee",
            "1 for the guarantee the worker runs with",
            "guarantee",
        )
        self.event_to_record = Histogram(
            "meterstream_event_to_record_seconds",
            "Seconds from an event's Kafka timestamp to its row in ClickHouse usage_events",
            registry=registry,
        )
        self.event_to_window = Histogram(
            "meterstream_event_to_window_seconds",
            "Seconds from an event's Kafka timestamp to its windows in ClickHouse meter_windows",
            registry=registry,
        )
        self.event_to_stripe = Histogram(
            "meterstream_event_to_stripe_seconds",
            "Seconds from the Kafka timestamp of the oldest event a Stripe meter event carries"
            " to Stripe accepting it (one observation per accepted meter event)",
            registry=registry,
        )
        self.stripe_arrivals = StripeArrivals(self.event_to_stripe)
        self.stripe_error_rows = gauge(
            "meterstream_stripe_error_rows",
            "Meter events Stripe refused, held until `meterstream stripe retry`, by meter",
            "meter",
        )
        self._error_rows: dict[tuple[str, str], int] = {}

    def held_errors(self, meter: str, period: str, rows: int) -> None:
        """A forward of ``meter``'s ``period`` found ``rows`` ledger rows in ``error``."""
        self._error_rows[(meter, period)] = rows
        total = sum(n for (m, _), n in self._error_rows.items() if m == meter)
        self.stripe_error_rows.set(total, meter=meter)

    def render(self) -> str:
        """Every metric in the Prometheus text format (0.0.4)."""
        return generate_latest(self.registry).decode()
