"""The producer SDK as the full installation names it: the code is the ``meterstream-client``
distribution's (``clients/python/meterstream_client/sdk.py``), plus
:meth:`UsageClient.from_settings`, which reads meterstream's settings."""

from __future__ import annotations

from typing import Any

from meterstream.endpoints import kafka_bootstrap
from meterstream.kafka import client_options
from meterstream.settings import Settings
from meterstream_client import *  # noqa: F403
from meterstream_client import __all__ as __all__
from meterstream_client import sdk as _sdk
from meterstream_client.sdk import backoff_delay as backoff_delay


class UsageClient(_sdk.UsageClient):  # type: ignore[no-redef]
    __doc__ = _sdk.UsageClient.__doc__

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> UsageClient:
        """A client for the broker, credentials and topic prefix of ``settings``."""
        return cls(
            kafka_bootstrap(settings),
            topic=settings.topic("usage-events"),
            **{**client_options(settings), **options},
        )
