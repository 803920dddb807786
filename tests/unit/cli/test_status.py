"""``meterstream status``'s reading of /metrics and its screen, without a stack."""

from __future__ import annotations

from rich.console import Console

from meterstream.cli.status import Status, parse_metrics, render
from meterstream.metrics import Metrics


def test_parse_metrics_reads_what_the_worker_renders() -> None:
    metrics = Metrics()
    metrics.events_in.inc(12)
    metrics.consumer_lag.set(5, partition="0")
    metrics.consumer_lag.set(7, partition="1")
    metrics.stripe_last_forward.set(1_765_000_000.5, meter="tokens")
    samples = parse_metrics(metrics.render())
    assert samples["meterstream_events_in_total"] == [({}, 12.0)]
    assert sorted(samples["meterstream_consumer_lag"], key=lambda s: s[0]["partition"]) == [
        ({"partition": "0"}, 5.0),
        ({"partition": "1"}, 7.0),
    ]
    assert samples["meterstream_stripe_last_forward_seconds"] == [
        ({"meter": "tokens"}, 1_765_000_000.5)
    ]


def screen(status: Status) -> str:
    console = Console(width=120, record=True, force_terminal=False)
    console.print(render(status, now=1_765_000_010.0))
    return console.export_text()


def test_the_screen_names_what_is_wrong() -> None:
    status = Status(
        web_url="http://127.0.0.1:6066",
        broker="tansu",
        bootstrap="127.0.0.1:9092",
        clickhouse="chdb:///s/clickhouse",
        ready=False,
        checks={"broker": "no answer for 40s", "clickhouse": "ok"},
        consumer_lag=12,
        lag_by_partition={"0": 5, "1": 7},
        events_per_second=3.5,
        events_in=100,
        accepted=90,
        rejected={"invalid_json": 10},
        stripe_last_forward={"tokens": 1_765_000_000.0},
        stripe_error_rows={"tokens": 2},
        problems=["broker: no answer for 40s"],
    )
    text = screen(status)
    for part in (
        "not ready",
        "no answer for 40s",
        "12 record(s)  (p0: 5, p1: 7)",
        "3.5  (read 100, accepted 90)",
        "10  (invalid_json: 10)",
        "(10 s ago)  2 in error",
        "! broker: no answer for 40s",
    ):
        assert part in text, text
    assert status.as_json()["consumer_lag"] == {"total": 12, "by_partition": {"0": 5, "1": 7}}


def test_nothing_forwarded_yet() -> None:
    status = Status(None, "?", "", "", ready=False, problems=["no running stack"])
    text = screen(status)
    assert "no forward yet" in text and "consumer lag   -" in text
