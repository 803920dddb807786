"""aiohttp's log of a request a client got wrong is one INFO line (pipeline/logs.py)."""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from meterstream.logs import ClientFaultsInOneLine


def record_of(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException:
        info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "Error handling request from %s",
        ("127.0.0.1",), info,
    )  # fmt: skip


def test_a_client_fault_is_one_info_line() -> None:
    for exc in (
        BadHttpMessage("Invalid character in chunk size: b'zz'"),
        LineTooLong("y" * 20000, "8190"),
        ConnectionResetError("Connection lost"),
    ):
        record = record_of(exc)
        assert ClientFaultsInOneLine().filter(record)
        assert record.levelno == logging.INFO and record.exc_info is None
        line = logging.Formatter("%(levelname)s %(message)s").format(record)
        assert "\n" not in line and len(line) < 400 and "Traceback" not in line
        assert line.startswith("INFO a bad request from 127.0.0.1: ")


def test_a_server_fault_keeps_its_traceback() -> None:
    record = record_of(RuntimeError("a bug"))
    assert ClientFaultsInOneLine().filter(record)
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "Traceback" in logging.Formatter().format(record)
