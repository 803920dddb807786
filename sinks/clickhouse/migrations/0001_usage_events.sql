-- The record: every accepted usage event, written by the record sink before it
-- commits Kafka offsets. Inserts are idempotent on (customer_id, idempotency_key):
-- ReplacingMergeTree collapses rows with the same ORDER BY key on merge, and
-- readers deduplicate at read time (LIMIT 1 BY / FINAL) until it has.
--
-- ORDER BY (customer_id, idempotency_key) is the collapsing key, and it also
-- serves the per-customer scans analysts and the reconciler run. Idempotency
-- keys from our SDK are time-ordered (UUIDv7/ULID-like), so within a customer
-- key order ~ time order: the minmax skip index on timestamp then lets a
-- per-customer time-range scan skip granules outside the range (and
-- PARTITION BY month prunes whole months).
--
-- non_replicated_deduplication_window: the last 1000 inserts are remembered, so
-- a retried batch carrying the same insert_deduplication_token is dropped
-- (measured on chdb as well as servers).
CREATE TABLE IF NOT EXISTS usage_events
(
    idempotency_key String,
    customer_id String,
    event_name LowCardinality(String),
    timestamp DateTime64(3, 'UTC'),
    properties String COMMENT 'canonical JSON text of the properties object, exact decimals',
    fingerprint String COMMENT 'content hash (event_name, timestamp, properties) to detect idempotency conflicts',
    key_derived UInt8 COMMENT '1 when the idempotency key was derived from the content',
    ingested_at DateTime64(3, 'UTC'),
    INDEX idx_timestamp timestamp TYPE minmax GRANULARITY 1
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(timestamp)
ORDER BY (customer_id, idempotency_key)
SETTINGS non_replicated_deduplication_window = 1000;
