"""merged_to_date: the running merge of windows the credit burn prices, against merge_windows
of every prefix (the definition)."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

import pytest

from meterstream.worker.invoices import merge_windows, merged_to_date

AGGREGATIONS = ["sum", "count", "max", "min", "unique_count", "latest"]


def _window(rng: random.Random) -> dict[str, Any]:
    return {
        "value": Decimal(rng.randint(-50, 500)) / Decimal(rng.choice([1, 10, 1000])),
        "distinct_values": [f"u{rng.randint(0, 30)}" for _ in range(rng.randint(0, 4))],
        "latest_ts_ms": rng.randint(0, 20),  # ties on purpose: the key decides
        "latest_key": rng.choice(["a", "b", "é", "Z", "ab"]),
    }


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("seed", range(20))
def test_equals_merge_windows_of_each_prefix(aggregation: str, seed: int) -> None:
    rng = random.Random(seed)
    batches = [[_window(rng) for _ in range(rng.randint(1, 3))] for _ in range(rng.randint(1, 40))]
    expected = [
        merge_windows(aggregation, [w for batch in batches[: i + 1] for w in batch])
        for i in range(len(batches))
    ]
    assert merged_to_date(aggregation, batches) == expected


def test_no_windows_no_values() -> None:
    assert merged_to_date("sum", []) == []
