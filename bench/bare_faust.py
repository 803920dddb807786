"""The bare-Faust ceiling: the pipeline's own faust.App settings, an agent that
only reads and decodes the source topic in batches of the pipeline's size.

Run as a subprocess with the worker's environment (``METERSTREAM_*``):

    python -m bench.bare_faust RESULT_JSON EXPECTED_RECORDS

The app is built with exactly the arguments ``meterstream.worker.app.create_app`` passes
to ``faust.App`` (captured by calling it with ``faust.App`` patched), and its source
topic is declared as the worker declares it (``usage_events_topic``), so a
setting that raises Faust's ceiling raises this number and the pipeline's
alike. The agent reads batches the way the worker does (``take_batches``, the
pipeline's batch size, timeout and backlog rule; the worker's garbage-collector
settings) and decodes every value with orjson; no tables, no sinks. When it has
seen EXPECTED_RECORDS it writes the timings to RESULT_JSON; the parent then
stops it.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, cast
from unittest import mock

import faust
import orjson

from meterstream.cli.worker import tune_gc
from meterstream.settings import load_settings
from meterstream.worker import app as pipeline_app
from meterstream.worker.batching import broker_backlog, take_batches
from meterstream.worker.raw_topics import usage_events_topic


class _Captured(Exception):
    pass


def pipeline_app_arguments(settings: Any, bootstrap: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The (args, kwargs) meterstream.worker.app.create_app gives faust.App for these settings."""

    def capture(*args: Any, **kwargs: Any) -> None:
        raise _Captured(args, kwargs)

    with mock.patch.object(pipeline_app.faust, "App", capture):
        try:
            pipeline_app.create_app(
                settings,
                cast(Any, None),  # no meters: the app is never built
                cast(Any, None),
                bootstrap,
                # the guarantee the bench gives the worker (exactly_once: transactions)
                guarantee_of(settings),
            )
        except _Captured as captured:
            args, kwargs = captured.args
            return tuple(args), dict(kwargs)
    raise RuntimeError("meterstream.worker.app.create_app did not construct a faust.App")


def guarantee_of(settings: Any) -> str:
    """The worker's guarantee where the bench sets it explicitly (it always does);
    ``auto`` would need the broker probed, as the worker does: at_least_once here."""
    return (
        "at_least_once"
        if settings.processing_guarantee == "auto"
        else str(settings.processing_guarantee)
    )


def main(result_path: str, expected: int) -> None:
    settings = load_settings()
    bootstrap = settings.kafka_bootstrap_servers or ""
    (settings.store_path or settings.state_dir / "faust").mkdir(parents=True, exist_ok=True)
    args, kwargs = pipeline_app_arguments(settings, bootstrap)
    app = faust.App(*args, **kwargs)
    source = usage_events_topic(app, settings)  # the worker's own declaration
    state: dict[str, Any] = {"n": 0, "batches": 0, "first": None, "last": None, "done": False}
    batch_size, within = settings.clickhouse_flush_rows, settings.clickhouse_flush_seconds

    @app.agent(source, name="bench.bare")
    async def bare(stream: Any) -> None:
        loads = orjson.loads
        async for batch in take_batches(stream, batch_size, within, broker_backlog(app)):
            if state["first"] is None:
                state["first"], state["cpu_first"] = time.time(), time.process_time()
            for event in batch:
                loads(event.message.value)
            state["n"] += len(batch)
            state["batches"] += 1
            state["last"], state["cpu_last"] = time.time(), time.process_time()
            if state["n"] >= expected and not state["done"]:
                state["done"] = True
                tmp = Path(result_path + ".tmp")
                tmp.write_text(
                    json.dumps(
                        {
                            "records": state["n"],
                            "batches": state["batches"],
                            "first_batch_at": state["first"],
                            "last_batch_at": state["last"],
                            "cpu_seconds": state["cpu_last"] - state["cpu_first"],
                            "batch_size": batch_size,
                            "within": within,
                            "app_kwargs": sorted(kwargs),
                        }
                    )
                )
                tmp.rename(result_path)

    tune_gc()  # the worker's garbage-collector settings
    worker = faust.Worker(
        app, loglevel="WARN", quiet=True, redirect_stdouts=False, override_logging=False
    )
    worker.execute_from_commandline()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
