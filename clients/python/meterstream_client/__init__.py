"""meterstream's producer SDK (the ``meterstream-client`` distribution): record usage
events from any Python program without blocking it, straight to Kafka
(:class:`UsageClient`) or through the worker's events API (:class:`HttpUsageClient`).

It needs only aiokafka, aiohttp, msgspec and simplejson: no Faust, chdb or ClickHouse
driver. The event contract it checks every event against (:mod:`meterstream_client.contract`)
is the one the worker validates with: the worker imports it from here.
"""

from meterstream_client.errors import MeterstreamError
from meterstream_client.sdk import (
    Abandoned,
    BufferFull,
    ClientClosed,
    ClientError,
    ClientOptions,
    DeliveryError,
    HttpUsageClient,
    InvalidEvent,
    UsageClient,
    build_event,
    uuid7,
)

__all__ = [
    "Abandoned",
    "BufferFull",
    "ClientClosed",
    "ClientError",
    "ClientOptions",
    "DeliveryError",
    "HttpUsageClient",
    "InvalidEvent",
    "MeterstreamError",
    "UsageClient",
    "build_event",
    "uuid7",
]
