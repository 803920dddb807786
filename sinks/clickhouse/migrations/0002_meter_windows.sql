-- Window totals from the Faust aggregators, one row per (meter, customer,
-- group, window) per version. The aggregator bumps version on every update,
-- so ReplacingMergeTree(version) keeps the newest; argMax(..., version) per key
-- is always a correct read, before or after merges.
--
-- value is the window result (Decimal, exact to 9 places). distinct_values is
-- filled for unique_count only: the canonical distinct values of the window, so
-- a period's distinct count is the size of the union (exact), not a sum.
-- latest_ts / latest_key are filled for latest only: the winning event's
-- timestamp and idempotency key, so windows merge into the latest of latests.
CREATE TABLE IF NOT EXISTS meter_windows
(
    meter LowCardinality(String),
    aggregation LowCardinality(String),
    customer_id String,
    group_key String COMMENT 'canonical JSON of the group_by values, {} when none',
    window_start DateTime64(3, 'UTC'),
    window_end DateTime64(3, 'UTC'),
    value Decimal(38, 9),
    event_count UInt64,
    distinct_values Array(String),
    latest_ts DateTime64(3, 'UTC'),
    latest_key String,
    version UInt64,
    updated_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMM(window_start)
ORDER BY (meter, customer_id, group_key, window_start)
SETTINGS non_replicated_deduplication_window = 1000;
