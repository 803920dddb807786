-- Fixing history (issue #26): the corrections log, the events each correction changed,
-- and the effective record (the record as every count reads it). usage_events is never
-- deleted from: a void or an amendment is a row here, read over the record.

-- The log: one row per correction (void, amend, backfill), append-only.
-- selector: JSON of what was asked (idempotency keys, or customer / event_name / meter /
-- [from, to) / property filters; for a backfill: the file's batch). A repeat of a
-- correction with the same correction_id finds this row and changes nothing.
CREATE TABLE IF NOT EXISTS corrections
(
    correction_id String,
    kind LowCardinality(String) COMMENT 'void, amend or backfill',
    author String COMMENT 'who asked: the --author given, and the API key id and name',
    reason String COMMENT 'why (required)',
    created_at DateTime64(3, 'UTC'),
    selector String COMMENT 'JSON: what the correction selected',
    events_affected UInt64 COMMENT 'events voided, amended or backfilled',
    windows_affected UInt64 COMMENT 'windows rebuilt from the record',
    status LowCardinality(String) COMMENT 'applied'
)
ENGINE = ReplacingMergeTree
ORDER BY correction_id;

-- One row per corrected event. The latest correction of an event wins (argMax by
-- (corrected_at, correction_id) at read time; rows are never collapsed across
-- corrections, so the history of an event stays queryable).
CREATE TABLE IF NOT EXISTS event_corrections
(
    customer_id String,
    idempotency_key String,
    correction_id String,
    action LowCardinality(String) COMMENT 'void or amend',
    properties String COMMENT 'amend: the canonical JSON properties that replace the event''s',
    corrected_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, idempotency_key, correction_id);

-- The effective record: usage_events with voided events left out and amended properties
-- in. Rows per key as in usage_events (read them with LIMIT 1 BY customer_id,
-- idempotency_key ORDER BY ingested_at, or FINAL-free as the worker does).
CREATE VIEW IF NOT EXISTS usage_events_effective AS
SELECT
    u.idempotency_key AS idempotency_key,
    u.customer_id AS customer_id,
    u.event_name AS event_name,
    u.timestamp AS timestamp,
    if(c.action = 'amend', c.properties, u.properties) AS properties,
    u.fingerprint AS fingerprint,
    u.key_derived AS key_derived,
    u.ingested_at AS ingested_at,
    u.meters AS meters,
    u.refused_meters AS refused_meters
FROM usage_events AS u
LEFT JOIN
(
    SELECT customer_id, idempotency_key,
        argMax(action, (corrected_at, correction_id)) AS action,
        argMax(properties, (corrected_at, correction_id)) AS properties
    FROM event_corrections
    GROUP BY customer_id, idempotency_key
) AS c ON u.customer_id = c.customer_id AND u.idempotency_key = c.idempotency_key
WHERE c.action != 'void';
