"""Every exception meterstream raises, under one root.

A bad *event* is never an exception that leaves the worker: it is a
:class:`meterstream.events.Rejection` (data, dead-lettered with a reason); the
:class:`BadInput` exceptions are raised and caught where data is read, to become one.
The others are for bad configuration and broken dependencies, which stop the worker
loudly.
"""

from __future__ import annotations

# The root is defined in the producer SDK's distribution (meterstream-client), which
# needs nothing of meterstream; every exception of the project nests under it.
from meterstream_client.errors import MeterstreamError as MeterstreamError


class ConfigError(MeterstreamError):
    """Configuration is invalid; ``problems`` lists every problem found, each with its path."""

    def __init__(self, problems: list[str], source: str = "configuration") -> None:
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} has {len(self.problems)} problem(s):\n{lines}")


class BadInput(MeterstreamError):
    """Bad data, not bad configuration or a broken dependency: whoever reads it turns it
    into a rejection (a bad event is dead-lettered with a reason) and goes on; it never
    stops the worker."""


class InvalidValue(BadInput):
    """A meter cannot read its value from an event (``Reason.INVALID_VALUE``); the
    worker dead-letters the event and it still counts for its other meters."""

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(detail)


class BadRecord(BadInput):
    """A ``customers`` topic record that is neither a mapping nor a tombstone."""


class PricingError(MeterstreamError):
    """An invoice cannot be computed from its inputs (unknown plan, mixed currencies, ...)."""


class DependencyError(MeterstreamError):
    """A dependency (broker, ClickHouse, Stripe) failed."""


class ClickHouseError(DependencyError):
    """ClickHouse rejected or failed a statement; keeps the server's error code."""

    def __init__(self, message: str, code: int | None = None) -> None:
        self.code = code
        super().__init__(message if code is None else f"[ClickHouse {code}] {message}")


class QueryRefused(ClickHouseError):
    """Read-only SQL the policy does not allow (nothing ran); ``problems`` says why."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("read-only SQL refused: " + "; ".join(self.problems), 164)


class QueryLimitExceeded(ClickHouseError):
    """Read-only SQL stopped at an operator's limit; ``setting`` is the METERSTREAM_ name."""

    def __init__(self, message: str, code: int | None, setting: str) -> None:
        self.setting = setting
        super().__init__(message, code)


class QueryCancelled(ClickHouseError):
    """Read-only SQL stopped because whoever asked for it went away."""


class MigrationError(ClickHouseError):
    """A schema migration failed; the worker must not start."""


class StripeError(DependencyError):
    """Stripe (or the emulator) answered with an error; keeps Stripe's error code."""

    def __init__(self, message: str, code: str | None = None, status: int | None = None) -> None:
        self.code = code
        self.status = status
        super().__init__(message)

    @property
    def retryable(self) -> bool:
        """429, 5xx and network failures (no status) are retried with the same identifier."""
        return self.status is None or self.status == 429 or self.status >= 500


class BrokerError(DependencyError):
    """The Kafka broker could not be started or reached."""


class CreditsError(MeterstreamError):
    """A credit input (grant, void, spend, threshold, purchase, webhook) is invalid."""


class CorrectionError(MeterstreamError):
    """A correction or backfill request is invalid (every problem listed)."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class PurchaseRefused(CreditsError):
    """A credit purchase that cannot be made (no Stripe customer or payment method, an id
    reused with other terms): answered 409, nothing charged."""


class WebhookSignatureError(CreditsError):
    """A webhook's signature header is missing, malformed, outside the tolerance or wrong."""


class MalformedBody(MeterstreamError, ValueError):
    """An events API body that is not JSON at all (HTTP 400)."""


class Denied(MeterstreamError):
    """An early HTTP answer (400, 401, 403, 408, 413, 415) with a JSON body ``{"error": ...}``."""

    def __init__(self, status: int, error: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status = status
        self.error = error
        self.headers = headers or {}


class NotEncodable(MeterstreamError, ValueError):
    """These rows cannot go to ClickHouse as JSON columns; insert them through the driver."""


class StatementError(MeterstreamError, ValueError):
    """Read-only SQL text refused before ClickHouse parses it."""


class AstDumpError(MeterstreamError, ValueError):
    """ClickHouse's EXPLAIN AST text is not a well-formed tree."""


class JournalLocked(MeterstreamError, RuntimeError):
    """Another process holds the Stripe emulator's journal."""
