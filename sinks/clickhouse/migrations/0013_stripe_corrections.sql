-- Corrections of periods already forwarded to Stripe (pipeline/billing/stripe_corrections.py).

-- The timestamp each meter event is sent with, chosen when its row is planned and kept for
-- its resends: every send of a (meter, customer, period) is stamped later than the ones
-- before, so a `last` meter's winner at Stripe is defined (0: a row from before).
ALTER TABLE stripe_meter_events ADD COLUMN IF NOT EXISTS timestamp_s Int64 DEFAULT 0 COMMENT 'meter event timestamp (epoch s); 0: not recorded';

-- What Stripe holds wrong and meterstream no longer corrects: a period past the correction
-- horizon (METERSTREAM_STRIPE_CORRECTION_DAYS; its Stripe invoice is taken as final) whose
-- record changed after it was forwarded, or a `last` tie Stripe no longer cancels. One row
-- per check; the greatest version per (meter, customer_id, period) is current, and a
-- difference of 0 means it was resolved. difference = expected - stripe_value, in the
-- meter's units as Stripe bills them; to_credit = max(0, -difference).
CREATE TABLE IF NOT EXISTS stripe_uncorrectable
(
    meter LowCardinality(String),
    customer_id String,
    stripe_customer_id String,
    period String COMMENT 'billing period YYYY-MM',
    formula LowCardinality(String) COMMENT 'sum | last (the Stripe meter formula)',
    stripe_value Nullable(Int64) COMMENT 'what Stripe bills from the events it accepted; NULL: a last tie',
    expected Int64 COMMENT 'what it should bill: the record total, rounded by the meter rule',
    exact_total Decimal(38, 9),
    difference Int64 COMMENT 'expected - stripe_value; negative: billed too much',
    to_credit Int64 COMMENT 'units to credit the customer: max(0, -difference)',
    reason LowCardinality(String) COMMENT 'past_correction_horizon | tie | resolved',
    detected_at DateTime64(3, 'UTC'),
    version UInt64
)
ENGINE = ReplacingMergeTree(version)
ORDER BY (meter, customer_id, period);
