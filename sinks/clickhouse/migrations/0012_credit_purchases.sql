-- Credit purchases through Stripe and auto-recharge (issue #25, items 2 and 6).

-- Every state of every purchase, one row per change (append-only): the latest `version`
-- of a purchase is its state. `state` is the whole state machine
-- (pipeline/credits/purchases.py PurchaseState) the worker reads back at start; the
-- other columns repeat it for analysts.
CREATE TABLE IF NOT EXISTS credit_purchases
(
    purchase_id String,
    customer_id String,
    origin LowCardinality(String) COMMENT 'purchase (operator) or recharge (auto-recharge)',
    amount Decimal(38, 18),
    currency LowCardinality(String),
    status LowCardinality(String) COMMENT 'created, succeeded or failed',
    payment_intent_id String COMMENT 'empty until Stripe has answered',
    stripe_event_ids Array(String) COMMENT 'events applied (webhooks evt_..., reads pi:...)',
    failure_code String,
    note String COMMENT 'what made this change (request, webhook, catch-up, mismatch)',
    state String COMMENT 'JSON of the purchase state machine',
    version UInt64 COMMENT 'order of the changes of one purchase',
    created_at DateTime64(3, 'UTC') COMMENT 'when the purchase was made',
    updated_at DateTime64(3, 'UTC') COMMENT 'when this row was written'
)
ENGINE = MergeTree
ORDER BY (customer_id, purchase_id, version);

-- Auto-recharge per customer, one row per change (append-only; the latest version is
-- current): the rule (NULL threshold: none set) and its state (enabled, armed, pending).
CREATE TABLE IF NOT EXISTS credit_recharge
(
    customer_id String,
    rule String COMMENT 'JSON of the rule (pipeline/credits/recharge.py AutoRecharge)',
    state String COMMENT 'JSON of the state (RechargeState)',
    enabled Bool,
    version UInt64,
    changed_by String,
    changed_at DateTime64(3, 'UTC')
)
ENGINE = MergeTree
ORDER BY (customer_id, version);
