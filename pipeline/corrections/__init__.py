"""Fixing history (issue #26), the pure part: what a correction selects, the effective
record (voids out, amendments in) and the dry-run's before/after. No Kafka, no ClickHouse:
the worker's wiring is pipeline/worker/corrections.py."""
