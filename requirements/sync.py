"""Make a virtualenv hold exactly what a lock file pins (``make install`` runs it after pip).

Usage: ``.venv/bin/python requirements/sync.py requirements/dev.txt meterstream``

``pip install -r LOCK`` installs and moves what the lock pins but never removes what the
lock no longer names (a dependency an upgrade dropped, a package installed by hand). This
uninstalls those, then checks that every pin whose environment marker holds here is
installed at its locked version, and exits 1 naming each one that is not. The names after
the lock (the project itself, installed editable) are kept and not checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import distributions
from pathlib import Path

from packaging.markers import Marker
from packaging.utils import canonicalize_name
from packaging.version import Version

# `name==version \` or `name==version ; marker \`, as uv pip compile writes a pin.
PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;(?P<marker>[^\\]+))?"
)


def locked(path: Path) -> dict[str, str]:
    """Every pin of the lock whose marker holds in this interpreter: name -> version."""
    pins: dict[str, str] = {}
    for line in path.read_text().splitlines():
        match = PIN.match(line)
        if match is None:
            continue
        marker = match.group("marker")
        if marker and not Marker(marker.strip()).evaluate():
            continue
        pins[canonicalize_name(match.group("name"))] = match.group("version")
    return pins


def installed() -> dict[str, str]:
    """Every distribution in this interpreter's environment: name -> version."""
    return {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}


def main(argv: list[str]) -> int:
    if len(argv) < 1:
        print(__doc__, file=sys.stderr)
        return 2
    lock = Path(argv[0])
    keep = {canonicalize_name(name) for name in argv[1:]}
    pins = locked(lock)
    extra = sorted(set(installed()) - set(pins) - keep)
    if extra:
        print(f"{lock}: removing what it does not pin: {', '.join(extra)}")
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "--quiet", "-y", *extra], check=True
        )
    have = installed()
    wrong = [
        f"{name}=={version} (installed: {have.get(name, 'none')})"
        for name, version in sorted(pins.items())
        if name not in have or Version(have[name]) != Version(version)
    ]
    if wrong:
        print(f"{lock}: not installed as pinned: {'; '.join(wrong)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
