"""The ``meterstream`` command: one module per command group (``python -m meterstream.cli``)."""
