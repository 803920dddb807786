-- Prepaid credits (issue #25): grants and voids as given, and the append-only ledger the
-- worker's burn engine (pipeline/credits/burn.py) writes. The balance of a customer is
-- the sum of its ledger (`SELECT sum(amount) FROM credit_ledger FINAL WHERE customer_id = ...`).

-- Every grant and every void, as given (operator, API). The worker rebuilds each
-- customer's credit book from these rows and the record at start.
CREATE TABLE IF NOT EXISTS credit_grants
(
    customer_id String,
    grant_id String,
    kind LowCardinality(String) COMMENT 'grant or void',
    amount Decimal(38, 18) COMMENT 'the grant''s amount (0 for a void)',
    currency LowCardinality(String),
    effective_at DateTime64(3, 'UTC') COMMENT 'grant: usable from; void: voided from',
    expires_at Nullable(DateTime64(3, 'UTC')) COMMENT 'grant: usable until (exclusive); null: never',
    priority UInt32 COMMENT 'burn order: lowest first',
    origin LowCardinality(String) COMMENT 'manual, promotion, purchase, recharge',
    reason String COMMENT 'void: why',
    changed_by String COMMENT 'API key id and name, or OS user',
    changed_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, grant_id, kind);

-- The ledger: one row per entry; `amount` is the signed effect on the balance.
-- kind: grant, recharge (+), burn (-), uncovered (- spend no grant covered; + when a
-- later grant settles it), settle (-), expiry (-), void (-). A late input adds a
-- correcting row for the same key (at_ms, kind, grant_id, source) with seq 1, 2, ...
-- and key_total = the key's sum after it. entry_id is a hash of the content: a row
-- written twice (replay after a crash) collapses; read with FINAL.
CREATE TABLE IF NOT EXISTS credit_ledger
(
    customer_id String,
    entry_id String,
    kind LowCardinality(String),
    amount Decimal(38, 18) COMMENT 'signed effect on the balance',
    currency LowCardinality(String),
    at DateTime64(3, 'UTC') COMMENT 'event time the entry accounts for',
    grant_id String COMMENT 'empty for uncovered',
    source String COMMENT 'what spent: meter|window_start_ms| (empty for grant, expiry, void)',
    seq UInt32,
    key_total Decimal(38, 18),
    cause String COMMENT 'what the engine was processing when it wrote the entry',
    written_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, entry_id);

-- Alert thresholds per customer (the whole list, JSON; the greatest version is current).
CREATE TABLE IF NOT EXISTS credit_alert_thresholds
(
    customer_id String,
    thresholds String COMMENT 'JSON list of thresholds (pipeline/credits/alerts.py)',
    version UInt64 COMMENT 'epoch ms of the change',
    changed_by String
)
ENGINE = ReplacingMergeTree(version)
ORDER BY customer_id;

-- Every change of a customer's threshold states, with the alerts it fired, in one row (one
-- insert: a state that says "fired" is never recorded without its alert). The latest
-- version per customer is the current state; a restart never fires an alert again.
CREATE TABLE IF NOT EXISTS credit_alerts
(
    customer_id String,
    version UInt64 COMMENT 'order of the changes of one customer',
    states String COMMENT 'JSON {threshold_id: state} after this change',
    alerts String COMMENT 'JSON list of the alerts fired by this change (may be empty)',
    created_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, version);

-- Each alert's delivery per channel: topic (billing-alerts) or webhook.
CREATE TABLE IF NOT EXISTS credit_alert_deliveries
(
    alert_id String,
    channel LowCardinality(String) COMMENT 'topic or webhook',
    delivered_at DateTime64(3, 'UTC'),
    attempts UInt32,
    outcome LowCardinality(String) COMMENT 'delivered, or dead (gave up after 3 days)'
)
ENGINE = ReplacingMergeTree
ORDER BY (alert_id, channel);
