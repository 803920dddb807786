"""The producer SDK: record usage events from any Python program (README, "Recording usage
from Python"). The code is the ``meterstream-client`` distribution's (clients/python);
these are its public names, with :class:`UsageClient` able to read meterstream's settings."""

from meterstream.client.sdk import *  # noqa: F403
from meterstream_client import __all__ as __all__
