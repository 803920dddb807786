"""The /metrics text: prometheus_client's, read back exactly by Prometheus's own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from meterstream.metrics import Metric, Metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_values_render_exactly() -> None:
    gauge = Metric("m_bytes", "help", "gauge", labels=("kind",))
    gauge.set(33_554_432, kind="capacity")  # 32 MB: six significant digits would round it
    gauge.set(1_234_567_891_234, kind="big")
    gauge.set(0.25, kind="fraction")
    assert _samples("\n".join(gauge.render()) + "\n") == {
        ("m_bytes", (("kind", "big"),)): 1_234_567_891_234,
        ("m_bytes", (("kind", "capacity"),)): 33_554_432,
        ("m_bytes", (("kind", "fraction"),)): 0.25,
    }


def test_each_metrics_has_its_own_registry() -> None:
    """Two workers in one process (the tests) never see each other's numbers."""
    one, two = Metrics(), Metrics()
    one.events_in.inc(3)
    one.rejected.inc(2, reason="invalid_json")
    assert (one.events_in.get(), two.events_in.get()) == (3, 0)
    assert one.rejected.get(reason="invalid_json") == 2 and one.rejected.total() == 2
    samples = _samples(one.render())
    assert samples[("meterstream_events_in_total", ())] == 3
    assert samples[("meterstream_events_rejected_total", (("reason", "invalid_json"),))] == 2
    assert not any(name.endswith("_created") for name, _ in samples)


def test_latency_histograms() -> None:
    metrics = Metrics()
    metrics.event_to_record.observe_since([10_000, 10_900, 11_000], now_s=11.0)
    metrics.event_to_window.observe_since([12_000], now_s=11.0)  # producer clock ahead: 0
    samples = _samples(metrics.render())
    record = "meterstream_event_to_record_seconds"
    assert samples[(f"{record}_count", ())] == 3
    assert abs(samples[(f"{record}_sum", ())] - 1.1) < 1e-9
    assert samples[(f"{record}_bucket", (("le", "0.1"),))] == 2  # 0 s and 0.1 s
    assert samples[(f"{record}_bucket", (("le", "1.0"),))] == 3
    assert samples[("meterstream_event_to_window_seconds_sum", ())] == 0
    assert samples[("meterstream_event_to_window_seconds_count", ())] == 1


def test_latencies_counted_per_batch_render_as_one_observation_each() -> None:
    """observe_since counts a batch into the buckets at once; the exposition is what
    prometheus_client's own observe() of each value gives (bounds included: le is <=)."""
    now = 100_000.0
    seconds = [0.0, 0.005, 0.0051, 0.1, 0.25, 0.7, 1.0, 2.5, 59.0, 86_400.0, 90_000.0, 3.3]
    arrivals = [round((now - s) * 1000) for s in seconds] + [now * 1000 + 5]  # one ahead
    batched, one_by_one = Metrics(), Metrics()
    batched.event_to_window.observe_since(arrivals, now_s=now)
    batched.event_to_window.observe_since([], now_s=now)
    for arrival in arrivals:
        one_by_one.event_to_window.observe(max(0.0, now - arrival / 1000))
    got, want = _samples(batched.render()), _samples(one_by_one.render())
    name = "meterstream_event_to_window_seconds"
    assert {k: v for k, v in got.items() if k[0].startswith(name)} == {
        k: v for k, v in want.items() if k[0].startswith(name)
    }
    assert got[(f"{name}_count", ())] == len(arrivals)
    assert got[(f"{name}_bucket", (("le", "0.005"),))] >= 2  # 0 and the one ahead at least
    assert got[(f"{name}_bucket", (("le", "+Inf"),))] == len(arrivals)


def test_stripe_latency_from_the_oldest_waiting_event() -> None:
    metrics = Metrics()
    arrivals = metrics.stripe_arrivals
    arrivals.recorded({("tokens", "c1"): 5_000, ("tokens", "c2"): 7_000})
    arrivals.recorded({("tokens", "c1"): 6_000, ("calls", "c1"): 1_000})
    assert len(arrivals) == 3
    arrivals.delivered("tokens", ["c1", "c3"])  # c3: nothing recorded, nothing observed
    assert metrics.event_to_stripe.count() == 1
    assert len(arrivals) == 2  # taken: the next delivery of c1 waits for new events
    arrivals.delivered("tokens", ["c1"])
    assert metrics.event_to_stripe.count() == 1
    arrivals.clear()  # a rebalance: nothing stale is taken later
    arrivals.delivered("tokens", ["c2"])
    assert metrics.event_to_stripe.count() == 1


def test_stripe_arrivals_are_bounded() -> None:
    metrics = Metrics()
    metrics.stripe_arrivals.limit = 2
    metrics.stripe_arrivals.recorded({("m", "a"): 1, ("m", "b"): 2, ("m", "c"): 3})
    assert len(metrics.stripe_arrivals) == 2


def test_error_rows_add_up_over_periods() -> None:
    metrics = Metrics()
    metrics.held_errors("tokens", "2026-11", 2)
    metrics.held_errors("tokens", "2026-12", 1)
    metrics.held_errors("tokens", "2026-12", 0)
    assert metrics.stripe_error_rows.get(meter="tokens") == 2


def test_label_names_left_to_the_first_call() -> None:
    """A metric declared the old way (no label names) still takes labelled calls."""
    metrics = Metrics()
    late = Metric("m_total", "help", "counter", registry=metrics.registry)
    assert list(late.render()) == [] and late.total() == 0
    late.inc(2, meter="tokens", outcome="sent")
    late.inc(outcome="sent", meter="calls")
    assert late.get(meter="tokens", outcome="sent") == 2 and late.total() == 3
    samples = _samples(metrics.render())
    assert samples[("m_total", (("meter", "calls"), ("outcome", "sent")))] == 1
    plain = Metric("n", "help", "gauge", registry=metrics.registry)
    plain.set(5)
    assert plain.get() == 5
