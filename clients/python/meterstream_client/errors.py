"""The root of every meterstream exception, shared by the SDK and the worker.

It lives here, in the SDK's distribution (``meterstream-client``), so the SDK needs
nothing else of meterstream; ``meterstream.errors`` re-exports it and nests every
other exception of the project under it.
"""

from __future__ import annotations


class MeterstreamError(Exception):
    """Root of every meterstream exception."""
