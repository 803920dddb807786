-- One row per Stripe meter event the forwarder sends, by its deterministic
-- identifier; every status change is a new version (pending -> sent | error),
-- so the newest row per identifier is the state.
CREATE TABLE IF NOT EXISTS stripe_meter_events
(
    identifier String,
    meter LowCardinality(String),
    customer_id String,
    stripe_customer_id String,
    period String COMMENT 'billing period YYYY-MM',
    value Int64 COMMENT 'whole number sent to Stripe',
    exact_total Decimal(38, 9) COMMENT 'exact period-to-date total; the fraction is carried',
    status LowCardinality(String) COMMENT 'pending | sent | error',
    error_code String,
    attempts UInt32,
    sent_at DateTime64(3, 'UTC'),
    updated_at DateTime64(3, 'UTC'),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY identifier
SETTINGS non_replicated_deduplication_window = 1000;
