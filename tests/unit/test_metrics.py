"""The /metrics text: values Prometheus reads back exactly."""

from __future__ import annotations

from meterstream.metrics import Metric


def test_values_render_exactly() -> None:
    gauge = Metric("m_bytes", "help", "gauge")
    gauge.set(33_554_432, kind="capacity")  # 32 MB: six significant digits would round it
    gauge.set(1_234_567_891_234, kind="big")
    gauge.set(0.25, kind="fraction")
    lines = {line.split(" ")[0]: line.split(" ")[1] for line in gauge.render() if line[0] != "#"}
    assert lines == {
        'm_bytes{kind="big"}': "1234567891234",
        'm_bytes{kind="capacity"}': "33554432",
        'm_bytes{kind="fraction"}': "0.25",
    }
