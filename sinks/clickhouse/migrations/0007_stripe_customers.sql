-- Which Stripe customer pays for a meterstream customer's usage (pipeline/stripe_ids.py).
-- ClickHouse is the durable copy: the embedded broker keeps nothing across a restart, so a
-- mapping that lived only on the `customers` topic was lost with it.

-- The operator's mapping, append-only: every change is a row and stays, so finance can
-- audit who changed what and when. A customer's current mapping is its row with the
-- greatest version; stripe_customer_id = '' means the mapping was removed. The engine
-- only collapses copies of one change (several workers import the same `customers`
-- topic record, with the record's timestamp as version).
CREATE TABLE IF NOT EXISTS customer_mappings
(
    customer_id String,
    stripe_customer_id String COMMENT 'empty: the mapping was removed',
    origin LowCardinality(String) COMMENT 'api (worker HTTP API), cli (direct), topic (customers topic)',
    changed_by String COMMENT 'API key id and name, OS user, or the topic',
    changed_at DateTime64(3, 'UTC'),
    version UInt64 COMMENT 'order of the changes of one customer (epoch ms); greatest = current'
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, version, stripe_customer_id);

-- stripe.customer_id_from: properties.<path> (opt-in): the first Stripe customer id a
-- customer's events gave, kept for good (an explicit mapping still wins). Append-only;
-- the earliest row per customer is the pin.
CREATE TABLE IF NOT EXISTS stripe_customer_pins
(
    customer_id String,
    stripe_customer_id String,
    source String COMMENT 'the event property it was read from',
    pinned_at DateTime64(3, 'UTC'),
    version UInt64 COMMENT 'epoch ms; the smallest per customer is the pin'
)
ENGINE = MergeTree
ORDER BY (customer_id, version);

-- Stripe customer ids named by event properties and refused: a change of a customer's
-- pinned id (changed), an id that belongs to another customer (claimed), several ids at
-- once before any was pinned (ambiguous). The customer is held, nothing is forwarded for
-- it, until the operator maps it (`meterstream customers set`). One row per refusal.
CREATE TABLE IF NOT EXISTS stripe_customer_refusals
(
    customer_id String,
    claimed_stripe_customer_id String COMMENT 'what the events name',
    reason LowCardinality(String) COMMENT 'changed | claimed | ambiguous',
    kept_stripe_customer_id String COMMENT 'the pinned id (changed), else empty',
    other_customer_id String COMMENT 'claimed: the customer the id belongs to',
    source String COMMENT 'the event property',
    meter LowCardinality(String) COMMENT 'the meter whose forward found it',
    detected_at DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, claimed_stripe_customer_id, reason);
