-- What the record says an event must not be counted for, decided once when the event
-- was first counted and honoured by every later computation from the record (window
-- rebuilds, reconciliation, the Stripe forwarder's verification):
--   * meter names: those meters refused the event because it would have taken a total
--     out of the meter's range (dead-lettered as invalid_value, naming the meter),
--   * ['*']: the event was set aside as unprocessable (processing it raised), it is
--     counted by no meter. Written as a second row for the same key with the epoch as
--     ingested_at, so every read of the record (first ingested row per key) keeps it.
-- Rows recorded before this migration read as [] (nothing refused): unchanged.
ALTER TABLE usage_events ADD COLUMN IF NOT EXISTS refused_meters Array(LowCardinality(String)) DEFAULT [];
