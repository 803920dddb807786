"""Where the running stack is: settings first, then ``<state dir>/endpoints.json``."""

from __future__ import annotations

from meterstream.embedded.processes import read_endpoints
from meterstream.errors import ConfigError
from meterstream.settings import Settings


def kafka_bootstrap(settings: Settings) -> str:
    if settings.kafka_bootstrap_servers:
        return settings.kafka_bootstrap_servers
    endpoints = read_endpoints(settings.state_dir) or {}
    if endpoints.get("kafka_bootstrap"):
        return endpoints["kafka_bootstrap"]
    raise ConfigError(
        [
            "no Kafka: set METERSTREAM_KAFKA_BOOTSTRAP_SERVERS, or start `meterstream run` "
            f"(it writes {settings.state_dir / 'endpoints.json'})"
        ]
    )


def web_url(settings: Settings) -> str | None:
    endpoints = read_endpoints(settings.state_dir) or {}
    return endpoints.get("web_url") or None
