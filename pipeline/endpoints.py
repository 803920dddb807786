"""Where the running stack is: settings first, then ``<state dir>/endpoints.json``
(written by ``meterstream run``, read by the CLI, the SDK and the customer mappings)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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


def write_endpoints(state_dir: Path, endpoints: dict[str, str]) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / "endpoints.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_endpoints(state_dir: Path) -> dict[str, str] | None:
    try:
        data = json.loads((state_dir / "endpoints.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
