"""Deduplication, pure: the dedup key, duplicate resolution, and what the record covers."""
