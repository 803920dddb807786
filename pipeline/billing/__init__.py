"""Stripe billing: forwarding (verify, plan, deliver), customer mappings, the record's
windows."""
