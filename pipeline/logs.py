"""Logging: structured JSON lines when not on a terminal, text on a terminal.

The Kafka clients' repeated messages are shown at most once per
``REPEAT_EVERY_SECONDS`` each (:class:`RepeatFilter`): a worker whose broker is
gone otherwise logs about a hundred connection errors a second.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

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


REPEAT_EVERY_SECONDS = 10.0
RATE_LIMITED_LOGGERS = ("aiokafka", "faust.transport")


class RepeatFilter(logging.Filter):
    """Lets through at most one record per (logger, level, message template) every
    ``every`` seconds from the loggers named in ``prefixes`` (and their children);
    the next one that passes says how many were held back. CRITICAL always passes."""

    MAX_KEYS = 1000

    def __init__(
        self,
        prefixes: tuple[str, ...] = RATE_LIMITED_LOGGERS,
        every: float = REPEAT_EVERY_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.prefixes = prefixes
        self.every = every
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[str, int, str], list[float]] = {}  # key -> [shown at, held]

    def _limited(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL or not self._limited(record.name):
            return True
        key = (record.name, record.levelno, str(record.msg))
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None and now - seen[0] < self.every:
                seen[1] += 1
                return False
            if len(self._seen) >= self.MAX_KEYS:
                self._seen.clear()
            self._seen[key] = [now, 0]
        if seen is not None and seen[1]:
            # No "%" added: the message is still formatted with the record's args.
            record.msg = (
                f"{record.msg} ({int(seen[1])} more like this in the last "
                f"{now - seen[0]:.0f} s not shown)"
            )
        return True


def configure_logging(fmt: str = "auto", level: int = logging.INFO) -> None:
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JsonFormatter()
        if use_json
        else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, ClientFaultsInOneLine) for f in server.filters):
        server.addFilter(ClientFaultsInOneLine())
    root.setLevel(logging.INFO if os.environ.get("METERSTREAM_DEBUG") else logging.WARNING)
    logging.getLogger("meterstream").setLevel(
        logging.DEBUG if os.environ.get("METERSTREAM_DEBUG") else level
    )
