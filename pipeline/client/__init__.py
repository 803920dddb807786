"""The producer SDK: record usage events from any Python program (README, "Recording usage
from Python"). The code is in :mod:`meterstream.client.sdk.sdk`; these are its public names."""

from meterstream.client.sdk import (
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
    "UsageClient",
    "build_event",
    "uuid7",
]
