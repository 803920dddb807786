"""Meters, pure: the meters file, aggregations, UTC windows and periods, the fold of events
into window states."""
