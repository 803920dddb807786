-- Prices (issue #24): which plan each customer is on, and the analysts' priced usage.

-- A customer's plan schedule, append-only: every change is a row with the whole schedule
-- (plans[i] is in effect from effective_from[i] until the next one; before the first,
-- the plans file's default plan). The current schedule is the row with the greatest
-- version; empty arrays mean no plan (the default plan prices everything). The engine
-- only collapses copies of one change (several workers import the same `customer-plans`
-- topic record, with the record's timestamp as version).
CREATE TABLE IF NOT EXISTS customer_plans
(
    customer_id String,
    plans Array(String) COMMENT 'plan names, in the order of effective_from',
    effective_from Array(DateTime64(3, 'UTC')) COMMENT 'when each plan takes effect (ascending)',
    origin LowCardinality(String) COMMENT 'api (worker HTTP API), cli (direct), topic (customer-plans topic)',
    changed_by String COMMENT 'API key id and name, OS user, or the topic',
    changed_at DateTime64(3, 'UTC'),
    version UInt64 COMMENT 'order of the changes of one customer (epoch ms); greatest = current'
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, version, plans, effective_from);

-- Priced usage per customer, meter and day, written by each pricing run of the worker
-- (pipeline/worker/invoices.py). One run prices a customer's whole period; the view
-- below shows the latest run of each customer and period only.
CREATE TABLE IF NOT EXISTS priced_usage_runs
(
    customer_id String,
    period_start DateTime64(3, 'UTC') COMMENT 'the billing period (calendar month, UTC)',
    run UInt64 COMMENT 'epoch ms of the pricing run',
    day Date COMMENT 'UTC day of the windows (by window_start)',
    meter LowCardinality(String),
    plan String COMMENT 'the plan in effect for this part of the period',
    segment_start DateTime64(3, 'UTC') COMMENT 'where that plan starts pricing in the period',
    currency LowCardinality(String),
    quantity Decimal(38, 9) COMMENT 'the meter''s value over the day (within the segment)',
    period_to_date Decimal(38, 9) COMMENT 'the meter''s value over the segment through this day',
    amount Decimal(76, 30) COMMENT 'exact, unrounded: what the day added to the line'
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(period_start)
ORDER BY (customer_id, period_start, run, meter, segment_start, day);

CREATE OR REPLACE VIEW priced_usage_daily AS
SELECT customer_id, period_start, day, meter, plan, segment_start, currency, quantity,
       period_to_date, amount
FROM priced_usage_runs
WHERE (customer_id, period_start, run) IN
(
    SELECT customer_id, period_start, max(run) FROM priced_usage_runs
    GROUP BY customer_id, period_start
);
