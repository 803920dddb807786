"""``python -m meterstream.cli``: the ``meterstream`` command."""

import sys

from meterstream.cli.main import main

sys.exit(main())
