"""Typed, frozen settings from the environment (prefix ``METERSTREAM_``).

Anything left unset that has an embedded stand-in (Kafka, ClickHouse, Stripe)
is started by ``meterstream run``. Secrets are ``SecretStr`` and never logged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from meterstream.errors import ConfigError
from meterstream.hosts import parse_allowed, split_list

DEFAULT_STATE_DIR = Path(".meterstream")
STRIPE_API_BASE = "https://api.stripe.com"
STRIPE_METER_EVENTS_BASE = "https://meter-events.stripe.com"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METERSTREAM_", frozen=True, extra="ignore")

    # Kafka
    kafka_bootstrap_servers: str | None = None
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_cafile: Path | None = None
    topic_prefix: str = ""
    partitions: int = Field(default=4, ge=1, le=1024)
    replication_factor: int = Field(default=1, ge=1)
    app_id: str = "meterstream"
    # A new consumer group member waits up to this long for the others to join.
    rebalance_timeout_seconds: float = Field(default=60.0, gt=0)
    # A worker that stops heartbeating for this long loses its partitions. The
    # embedded broker also holds a group join for about half of it.
    session_timeout_seconds: float = Field(default=10.0, ge=2)
    processing_guarantee: Literal["auto", "at_least_once", "exactly_once"] = "auto"
    # A worker with no answer from the broker for this long (since the last one)
    # exits with code 69 (pipeline/worker/lifeline.py), to be restarted.
    broker_lost_seconds: float = Field(default=60.0, ge=1)
    # The broker `meterstream run` and `meterstream broker` start when no bootstrap
    # servers are set (pipeline/embedded/kafka.py): auto = Apache Kafka where Java 17+
    # and its jars (`make kafka-jars`) are found, Tansu otherwise.
    embedded_broker: Literal["auto", "kafka", "tansu"] = "auto"
    # The java executable for the embedded Kafka (default $JAVA_HOME/bin/java, or java
    # on PATH), and the folder of Kafka's jars (default deploy/kafka/jars).
    kafka_java: str | None = None
    kafka_jars_dir: Path | None = None

    # ClickHouse
    clickhouse_dsn: str | None = None
    clickhouse_user: str | None = None
    clickhouse_password: SecretStr | None = None
    clickhouse_database: str = "meterstream"
    # A batch's fixed work is per window it touches, and a batch of 10,000 touches
    # fewer windows per event than one of 5,000 (bench/meters.yaml, 1,000 customers:
    # 0.74 against 0.91), so each event costs less: the worker's CPU per record fell
    # ~15% in make bench. Smaller batches shorten the wait of events that arrive while
    # a worker catches up (bench/README.md, "Batches of 10,000").
    clickhouse_flush_rows: int = Field(default=10000, ge=1)
    clickhouse_flush_seconds: float = Field(default=0.25, gt=0)

    # Stripe
    stripe_api_key: SecretStr | None = None
    stripe_api_base: str | None = None
    stripe_meter_events_base: str | None = None
    stripe_rate_limit_per_second: float = Field(default=25.0, gt=0)
    # v2 meter event stream (batches of 100) or v1 meter_events; auto = v2 with a live key.
    stripe_transport: Literal["auto", "v1", "v2"] = "auto"
    # How long after a billing period ends it is still corrected at Stripe (its invoice is
    # taken as final after that: a later change is reported in stripe_uncorrectable). At
    # most 31: a correction is stamped in the period's last hour, which must stay within
    # Stripe's 35 days.
    stripe_correction_days: int = Field(default=3, ge=0, le=31)

    # Worker
    state_dir: Path = DEFAULT_STATE_DIR
    meters_file: Path | None = None
    # The plans beside the meters (pipeline/pricing/plans.py); unset: none, every customer
    # is on the built-in free plan (usage metered, not charged).
    plans_file: Path | None = None
    # How often the worker reprices the current (and previous) period into ClickHouse
    # priced_usage_daily (pipeline/worker/invoices.py); 0 turns it off.
    pricing_refresh_seconds: float = Field(default=60.0, ge=0)
    # How often the worker burns prepaid credits for the customers whose usage changed
    # (and writes expiries that came due; pipeline/worker/credits.py).
    credits_burn_seconds: float = Field(default=1.0, gt=0)
    # How long a credit purchase waits for Stripe's webhook before the worker reads its
    # PaymentIntent back (a lost webhook loses nothing; pipeline/worker/purchases.py).
    credits_purchase_catch_up_seconds: float = Field(default=60.0, gt=0, le=86_400)
    # Where credit alerts are POSTed, signed with the secret (pipeline/worker/alerts.py);
    # unset: alerts go to the topic billing-alerts only.
    credits_webhook_url: str | None = None
    credits_webhook_secret: SecretStr | None = None
    # The signing secret (whsec_...) of Stripe's webhook to POST /v1/stripe/webhooks (credit
    # purchases, pipeline/worker/purchases.py); unset: that route answers 404.
    stripe_webhook_secret: SecretStr | None = None
    dedup_horizon_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    store: Literal["memory", "rocksdb"] = "memory"
    store_path: Path | None = None
    # RocksDB memory (pipeline/worker/tables.py): two write buffers of this size per table
    # partition, and one block cache for the whole worker, which the memtables of
    # every partition are charged to (flushed when they reach half of it).
    rocksdb_write_buffer_mb: int = Field(default=2, ge=1, le=1024)
    rocksdb_block_cache_mb: int = Field(default=32, ge=4, le=65536)
    web_host: str = "127.0.0.1"
    web_port: int = Field(default=6066, ge=0, le=65535)
    # Host names the web server answers to besides loopback (and, off loopback, any IP
    # address): comma-separated names, ".example.com" for a domain and its subdomains,
    # "*" for any. Other names get 421 (DNS rebinding; see pipeline/hosts.py).
    web_allowed_hosts: str = ""
    log_format: Literal["auto", "json", "text"] = "auto"
    # Set by `meterstream run` for its worker: when that process is gone, the
    # worker stops and exits within a few seconds (pipeline/worker/lifeline.py).
    supervisor_pid: int | None = Field(default=None, ge=1)

    # Web API
    # Where API key hashes live (default <state_dir>/api_keys.json); see pipeline/api/keys.py.
    api_keys_file: Path | None = None
    # Reads of customer data (/v1/sql, usage): auto = a key is required unless the
    # web server listens on loopback only (the embedded default); required = always.
    api_read_auth: Literal["auto", "required"] = "auto"
    api_max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # A request body must have arrived this long after the handler starts reading it (408).
    api_body_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    # The key the CLI (`meterstream sql`, `usage`) sends to a worker that requires one.
    api_key: SecretStr | None = None
    # Signs the billing page's customer links (`meterstream billing link`; pipeline/api/
    # links.py). Unset: a random secret kept in <state_dir>/billing-link.secret (0600),
    # made on first use; every worker that serves the page needs the same one.
    billing_link_secret: SecretStr | None = None
    # The longest a billing link may live (`--expires` above this is refused).
    billing_link_max_seconds: int = Field(default=30 * 86400, ge=60)
    # End each batch's changelog writes with a one-record batch (see Pipeline._end_markers).
    changelog_end_markers: bool = True
    # Read-only SQL for analysts (POST /v1/sql, `meterstream sql`): limits of one query,
    # applied as ClickHouse settings no statement can change (sinks/clickhouse/analyst.py).
    sql_max_seconds: float = Field(default=30.0, gt=0, le=3600)
    sql_max_memory_mb: int = Field(default=512, ge=16)
    sql_max_rows_read: int = Field(default=100_000_000, ge=1)
    sql_max_result_rows: int = Field(default=100_000, ge=1)
    sql_max_result_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    sql_max_threads: int = Field(default=1, ge=1, le=256)
    # Analyst queries running at once (each on its own thread and connection).
    sql_max_concurrent: int = Field(default=2, ge=1, le=64)
    # A ClickHouse server user for analyst SQL (read-only profile, SELECT on the
    # database only; deploy/README.md). Unset: the worker's user with readonly=1.
    sql_clickhouse_user: str | None = None
    sql_clickhouse_password: SecretStr | None = None
    # Fault injection for tests: while this file exists, every ClickHouse call of the
    # writer (record, windows, forwarder; sinks/clickhouse/calls.py) fails; reads do not.
    fault_clickhouse_down_file: Path | None = None
    # Fault injection for tests: counting an event whose idempotency key starts with this
    # raises inside the batch, after its record and meter_windows inserts (the batch
    # isolation must set the event aside and count the rest).
    fault_unprocessable_key: str | None = None

    @field_validator(
        "kafka_bootstrap_servers",
        "kafka_sasl_password",
        "kafka_java",
        "kafka_jars_dir",
        "api_key",
        "clickhouse_dsn",
        "clickhouse_password",
        "sql_clickhouse_user",
        "sql_clickhouse_password",
        "stripe_api_key",
        "stripe_api_base",
        "stripe_meter_events_base",
        "stripe_webhook_secret",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """``VAR=`` (as compose files and manifests often leave it) means not set."""
        return None if value == "" else value

    @field_validator("clickhouse_dsn")
    @classmethod
    def _dsn_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("chdb://", "http://", "https://")):
            raise ValueError("must start with chdb://, http:// or https://")
        return value

    @field_validator("web_allowed_hosts")
    @classmethod
    def _allowed_hosts(cls, value: str) -> str:
        _, problems = parse_allowed(split_list(value))
        if problems:
            raise ValueError("; ".join(problems))
        return value

    def topic(self, name: str) -> str:
        return f"{self.topic_prefix}{name}"

    @property
    def keys_file(self) -> Path:
        return self.api_keys_file or self.state_dir / "api_keys.json"

    @property
    def allowed_hosts(self) -> list[str]:
        return split_list(self.web_allowed_hosts)

    @property
    def reads_need_key(self) -> bool:
        loopback = self.web_host in ("127.0.0.1", "::1", "localhost")
        return self.api_read_auth == "required" or not loopback

    @property
    def embedded_clickhouse_dsn(self) -> str:
        return f"chdb://{(self.state_dir / 'clickhouse').resolve()}"


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment plus overrides; every problem reported at once."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        problems = [
            f"METERSTREAM_{'.'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in exc.errors()
        ]
        raise ConfigError(problems, source="settings") from None
