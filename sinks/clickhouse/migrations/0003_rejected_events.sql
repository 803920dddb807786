-- Everything not counted, with a machine-readable reason (pipeline.events.Reason):
-- the dead-letter topic usage-events-dlq lands here. Plain MergeTree: rejected
-- events have no identity to collapse on; a retried flush is dropped through
-- its insert_deduplication_token (window of the last 1000 inserts).
CREATE TABLE IF NOT EXISTS rejected_events
(
    received_at DateTime64(3, 'UTC'),
    reason LowCardinality(String),
    detail String,
    raw String COMMENT 'the record value as received (UTF-8, invalid bytes replaced)',
    customer_id String,
    idempotency_key String,
    meter String
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(received_at)
ORDER BY (reason, received_at)
SETTINGS non_replicated_deduplication_window = 1000;
