"""The demo: its load and expected totals, the ledger of earlier runs, the screen and summary."""
