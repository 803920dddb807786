"""The usage event contract (DESIGN.md, "The event") and its validation.

One source, shared with the producer SDK: the code lives in the SDK's own
distribution, ``clients/python/meterstream_client/contract.py`` (installed as
``meterstream-client``, which needs no Faust, chdb or ClickHouse driver), and the
worker imports it from there through this module. Change the contract there.
"""

from meterstream_client.contract import *  # noqa: F403
