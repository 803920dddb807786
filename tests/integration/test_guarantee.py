"""The processing-guarantee probe against the embedded broker (Tansu has no transactions)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from meterstream.embedded.tansu import EmbeddedBroker
from meterstream.settings import Settings
from meterstream.worker.guarantee import broker_supports_transactions, choose, describe

pytestmark = pytest.mark.integration


def test_no_transactions_on_tansu_is_an_answer_not_an_error(
    tansu_broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture
) -> None:
    """aiokafka logs the refused InitProducerId at ERROR: on every worker start that
    was an ERROR line for something expected. Now: one INFO line with the reason."""
    sender = logging.getLogger("aiokafka.producer.sender")
    before = sender.level
    caplog.set_level(logging.DEBUG)
    assert asyncio.run(broker_supports_transactions(tansu_broker.bootstrap)) is False
    loud = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.WARNING]
    assert loud == []
    assert sender.level == before  # quiet during the probe only
    settings = Settings(processing_guarantee="auto")
    guarantee = choose(settings, False)
    assert describe(settings, guarantee) == (
        "processing guarantee: at_least_once (the broker has no transactions: "
        "InitProducerId refused; the record keeps the totals exact)"
    )
    forced = Settings(processing_guarantee="at_least_once")
    assert describe(forced, choose(forced, False)) == "processing guarantee: at_least_once"
