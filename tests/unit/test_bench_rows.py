"""The benchmark's configurations and how it reports a ratio over repeated runs
(bench/run.py; the measuring itself runs with `make bench`)."""

from __future__ import annotations

import pytest

from bench.run import Row, median, parse_args, rows_for, spread_text


def test_kafka_headline_is_the_production_configuration_with_the_extra_rows() -> None:
    args = parse_args(["--broker", "kafka"])
    assert (args.store, args.guarantee, args.repeat) == ("rocksdb", "exactly_once", 3)
    assert rows_for(args) == [
        Row("kafka", "rocksdb", "exactly_once", headline=True),
        Row("kafka", "memory", "exactly_once"),
        Row("tansu", "rocksdb", "at_least_once"),
    ]
    assert rows_for(args)[0].label == "Apache Kafka, rocksdb, exactly_once"


def test_without_a_broker_the_bench_is_what_it_was() -> None:
    args = parse_args([])
    assert rows_for(args) == [Row("tansu", "memory", "at_least_once", headline=True)]
    assert parse_args(["--quick"]).repeat == 1


def test_extra_rows_on_request_and_no_row_twice() -> None:
    args = parse_args(["--broker", "kafka", "--extra-rows", "at_least_once,kafka"])
    assert rows_for(args) == [
        Row("kafka", "rocksdb", "exactly_once", headline=True),
        Row("kafka", "rocksdb", "at_least_once"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["--guarantee", "exactly_once"],  # Tansu has no transactions
        ["--broker", "kafka", "--extra-rows", "redis"],
        ["--repeat", "0"],
    ],
)
def test_impossible_configurations_are_refused(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_a_ratio_prints_as_median_and_range_of_its_runs() -> None:
    assert median([0.207, 0.189, 0.200]) == 0.200
    assert median([0.4, 0.6]) == 0.5
    spread = {"median": 0.2, "min": 0.189, "max": 0.207}
    assert spread_text(spread, 3) == "0.200 (median of 3, min-max 0.189-0.207)"
    assert spread_text(spread, 1) == "0.200 (one run)"
