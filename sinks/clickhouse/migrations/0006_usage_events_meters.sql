-- The meters that counted each event when it was accepted (filters included), so
-- analysts can find accepted events that no meter counts: WHERE empty(meters).
-- Events recorded before this migration read as [] and are excluded by ingested_at.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS meters Array(LowCardinality(String)) DEFAULT [];
