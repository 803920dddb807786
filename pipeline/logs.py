"""Logging: structured JSON lines when not on a terminal, text on a terminal."""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys

import orjson


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(doc).decode()


class ClientFaultsInOneLine(logging.Filter):
    """aiohttp's server logs a request a client got wrong (a broken request line,
    header or chunked body) as ERROR with a traceback, so any client could fill the
    log with them. Such a record becomes one INFO line; a fault of the server (any
    other exception) keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError | ConnectionError):
            detail = " ".join(str(getattr(exc, "message", "") or exc).split())[:200]
            said = record.getMessage().replace("Error handling request", "a bad request", 1)
            record.msg, record.args = "%s: %s: %s", (said, type(exc).__name__, detail)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def configure_logging(fmt: str = "auto", level: int = logging.INFO) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientFaultsInOneLine) for f in server.filters):
        server.addFilter(ClientFaultsInOneLine())
    root.setLevel(logging.INFO if os.environ.get("METERSTREAM_DEBUG") else logging.WARNING)
    logging.getLogger("meterstream").setLevel(
        logging.DEBUG if os.environ.get("METERSTREAM_DEBUG") else level
    )
