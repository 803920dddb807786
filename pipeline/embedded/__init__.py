"""The embedded dev stack (``meterstream run``): brokers, processes, the demo."""
