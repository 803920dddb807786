"""Process-local counters and gauges, rendered in the Prometheus text format.

Deliberately tiny (no client library): labelled counters, gauges and summaries
(count + sum), which is what /metrics needs.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable

Labels = tuple[tuple[str, str], ...]


def _labels(labels: dict[str, str]) -> Labels:
    return tuple(sorted(labels.items()))


def _fmt(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(
        f'{k}="{v.replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"'
        for k, v in labels
    )
    return "{" + inner + "}"


class Metric:
    def __init__(self, name: str, help_text: str, kind: str) -> None:
        self.name = name
        self.help = help_text
        self.kind = kind
        self.values: dict[Labels, float] = defaultdict(float)
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, **labels: str) -> None:
        with self._lock:
            self.values[_labels(labels)] += amount

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self.values[_labels(labels)] = value

    def get(self, **labels: str) -> float:
        return self.values.get(_labels(labels), 0.0)

    def total(self) -> float:
        return sum(self.values.values())

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} {self.kind}"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_fmt(labels)} {_value(value)}"


def _value(value: float) -> str:
    """Exact text: ``{:g}`` keeps 6 digits (33554432 became 3.35544e+07)."""
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Summary:
    """count and sum of observations (e.g. batch sizes, latencies)."""

    def __init__(self, name: str, help_text: str) -> None:
        self.count = Metric(f"{name}_count", help_text, "counter")
        self.sum = Metric(f"{name}_sum", help_text, "counter")

    def observe(self, value: float, **labels: str) -> None:
        self.count.inc(1, **labels)
        self.sum.inc(value, **labels)

    def render(self) -> Iterable[str]:
        yield from self.count.render()
        yield from self.sum.render()


class Metrics:
    def __init__(self) -> None:
        c, g = "counter", "gauge"
        self.events_in = Metric("meterstream_events_in_total", "Records read from usage-events", c)
        self.accepted = Metric(
            "meterstream_events_accepted_total", "Events accepted into the record", c
        )
        self.duplicates = Metric(
            "meterstream_events_duplicate_total", "Exact duplicates dropped", c
        )
        self.rejected = Metric(
            "meterstream_events_rejected_total", "Events dead-lettered, by reason", c
        )
        self.unmetered = Metric(
            "meterstream_events_unmetered_total", "Accepted events matching no meter", c
        )
        self.meter_updates = Metric(
            "meterstream_meter_updates_total", "Event contributions per meter", c
        )
        self.windows_recomputed = Metric(
            "meterstream_windows_recomputed_total", "Window states rebuilt from the record", c
        )
        self.window_rebuilds = Metric(
            "meterstream_window_rebuilds_total",
            "Window states rebuilt from the record, by reason: absent (the table held no state"
            " and the window was not provably new), uncounted (events in the record that no"
            " table write counted: a batch replayed after a crash), isolation (rewritten after"
            " a batch isolation)",
            c,
        )
        self.end_markers = Metric(
            "meterstream_changelog_end_markers_total",
            "One-record batches that end a batch's changelog writes per partition"
            " (Pipeline._end_markers; METERSTREAM_CHANGELOG_END_MARKERS)",
            c,
        )
        self.windows_new = Metric(
            "meterstream_windows_new_total",
            "Windows unknown to the table and provably new (not rebuilt from the record)",
            c,
        )
        self.record_lookups = Metric(
            "meterstream_record_lookups_total", "Dedup keys unknown to the table, looked up", c
        )
        self.record_lookups_skipped = Metric(
            "meterstream_record_lookups_skipped_total",
            "Dedup keys unknown to the table and provably fresh (not looked up)",
            c,
        )
        self.repairs = Metric(
            "meterstream_window_repairs_total", "Windows whose total differed from the record", c
        )
        self.verify_days = Metric(
            "meterstream_verify_days_total",
            "Changed customer-days checked against the record before forwarding, and re-read",
            c,
        )
        self.sink_batch_rows = Summary("meterstream_sink_batch_rows", "Rows per ClickHouse insert")
        self.sink_seconds = Summary("meterstream_sink_seconds", "Seconds per ClickHouse insert")
        self.sink_retries = Metric(
            "meterstream_sink_retries_total", "ClickHouse inserts retried", c
        )
        self.stripe_requests = Metric(
            "meterstream_stripe_requests_total", "Stripe meter event requests, by outcome", c
        )
        self.stripe_waiting = Metric(
            "meterstream_stripe_waiting_customers",
            "Customers held back because no Stripe customer id is known yet, by meter",
            g,
        )
        self.stripe_last_forward = Metric(
            "meterstream_stripe_last_forward_seconds",
            "Start (epoch seconds) of the last forward of a meter that delivered everything it "
            "planned: every window that had closed grace before it is at Stripe",
            g,
        )
        self.stripe_refused = Metric(
            "meterstream_stripe_refused_customers",
            "Customers held back because their events name a refused Stripe customer id",
            g,
        )
        self.stripe_refusals = Metric(
            "meterstream_stripe_customer_refusals_total",
            "Stripe customer ids named by event properties and refused, by reason",
            c,
        )
        self.consumer_lag = Metric(
            "meterstream_consumer_lag", "Records behind the end, by partition", g
        )
        self.gap_records = Metric(
            "meterstream_gap_records_total",
            "Records Faust skipped, read directly by offset and processed",
            c,
        )
        self.batch_isolations = Metric(
            "meterstream_batch_isolations_total",
            "Batches that raised and were bisected to set the failing records aside",
            c,
        )
        self.stripe_held_range = Metric(
            "meterstream_stripe_held_out_of_range",
            "Series held back because their period total does not fit Stripe's whole numbers",
            g,
        )
        self.api_requests = Metric(
            "meterstream_api_requests_total", "Web API requests, by route and status", c
        )
        self.api_events = Metric(
            "meterstream_api_events_total", "Events written to usage-events by the events API", c
        )
        self.sql_queries = Metric(
            "meterstream_sql_queries_total",
            "Analyst SQL statements, by outcome (ok, refused, limit, cancelled, busy, error)",
            c,
        )
        self.api_keys_file_ok = Metric(
            "meterstream_api_keys_file_ok",
            "1 while the API keys file reads cleanly; 0 while it is broken and the worker"
            " serves the last good keys",
            g,
        )
        self.api_keys_file_errors = Metric(
            "meterstream_api_keys_file_errors_total",
            "Versions of the API keys file that could not be read",
            c,
        )
        self.table_keys = Metric("meterstream_table_keys", "Keys held in a worker table", g)
        self.rocksdb_memory = Metric(
            "meterstream_rocksdb_memory_bytes",
            "RocksDB block cache in use, memtables charged to it included, and its capacity",
            g,
        )
        self.guarantee = Metric(
            "meterstream_processing_guarantee", "1 for the guarantee the worker runs with", g
        )

    def all(self) -> list[Metric | Summary]:
        return [v for v in vars(self).values() if isinstance(v, Metric | Summary)]

    def render(self) -> str:
        return "\n".join(line for metric in self.all() for line in metric.render()) + "\n"
