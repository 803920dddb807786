"""The README's examples, run verbatim against a real stack, as a newcomer runs them.

A newcomer clones the repository, runs ``make run`` in one terminal and the
README's commands in a second one, from the repository root. Here: a temporary
root holding the repository (a link to each of its top-level entries, ``.venv``
included) and nothing of its state dir, where the recipe of ``make run``
(``.venv/bin/meterstream run --meters meters.example.yaml --demo``, read from the
Makefile) starts the embedded stack in ``.meterstream/``; the examples'
``.venv/bin/meterstream`` and ``.meterstream/endpoints.json`` resolve there. One
stack for every block.

Every block of tests/readme_blocks.py's documents runs (see that module for the
convention: languages, ``<!-- not run: why -->`` markers, ``# =>`` expected output),
in document order, then all of them a second time on the same stack, as a reader
who goes through the README again: an example must work on a state dir that has
seen it already. Last, Ctrl-C (SIGINT) must stop the stack with exit status 0.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from meterstream.events import loads_exact, repeated_key_problems, validate_document
from meterstream.meters.config import StripeBlock, load_meters
from meterstream.pricing.plans import load_plans
from tests.harness import REPO, http_json, wait_until
from tests.readme_blocks import Block, load, make_run_command, missing_output

pytestmark = pytest.mark.integration

BLOCKS, _ = load()  # the convention itself: tests/unit/test_readme_blocks.py
RUNNABLE = [b for b in BLOCKS if b.runnable]
ROUNDS = (1, 2)
# Left out of the copy: the repository's own state, history and caches.
NOT_COPIED = {".git", ".meterstream", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
BLOCK_TIMEOUT = 180


def _env() -> dict[str, str]:
    """A newcomer's shell: nothing of meterstream's settings set."""
    return {k: v for k, v in os.environ.items() if not k.startswith("METERSTREAM_")}


@dataclass
class Newcomer:
    root: Path
    scratch: Path
    proc: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.scratch / "make-run.out"

    @property
    def state(self) -> Path:
        return self.root / ".meterstream"

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                make_run_command((REPO / "Makefile").read_text()),
                cwd=self.root, env=_env(), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip
        wait_until(
            lambda: (self.state / "endpoints.json").exists() or self.proc.poll() is not None,
            timeout=240,
            what="meterstream run to write .meterstream/endpoints.json",
        )
        assert self.proc.poll() is None, "meterstream run stopped:\n" + self.context()

    def alive(self) -> bool:
        """``meterstream run`` runs and its worker answers ``/healthz``."""
        if self.proc is None or self.proc.poll() is not None:
            return False
        endpoints = json.loads((self.state / "endpoints.json").read_text())
        try:
            http_json(f"{endpoints['web_url']}/healthz", timeout=10)
        except OSError:
            return False
        return True

    def stop(self) -> int | None:
        """Ctrl-C, as a newcomer stops ``make run``; SIGKILL if it does not stop."""
        if self.proc is None or self.exit_code is not None:
            return self.exit_code
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()  # the kernel then signals its children
                self.proc.wait(timeout=30)
        self.exit_code = self.proc.returncode
        return self.exit_code

    def context(self) -> str:
        def tail(path: Path, n: int = 40) -> str:
            with contextlib.suppress(OSError):
                return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
            return "(none)"

        return (
            f"--- meterstream run output ---\n{tail(self.log, 20)}\n"
            f"--- .meterstream/worker.log ---\n{tail(self.state / 'worker.log')}"
        )


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Newcomer]:
    root = tmp_path_factory.mktemp("repo")
    for entry in REPO.iterdir():
        if entry.name not in NOT_COPIED:
            (root / entry.name).symlink_to(entry)
    reader = Newcomer(root, tmp_path_factory.mktemp("scratch"))
    try:
        reader.start()
        yield reader
    finally:
        reader.stop()


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str
    what: str


def _run(newcomer: Newcomer, argv: list[str], what: str) -> Result:
    try:
        done = subprocess.run(
            argv, cwd=newcomer.root, env=_env(), capture_output=True, text=True,
            timeout=BLOCK_TIMEOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        return Result(-1, out, f"timed out after {BLOCK_TIMEOUT} s", what)
    return Result(done.returncode, done.stdout, done.stderr, what)


def run_sh(newcomer: Newcomer, block: Block) -> list[Result]:
    return [_run(newcomer, ["bash", "-c", "set -euo pipefail\n" + block.text], "bash")]


def run_python(newcomer: Newcomer, block: Block) -> list[Result]:
    # The program file lives outside the root, as a user's own program would.
    program = newcomer.scratch / f"example_{block.doc.replace('/', '_')}_{block.line}.py"
    program.write_text(block.text)
    return [_run(newcomer, [".venv/bin/python", str(program)], "python")]


def run_sql(newcomer: Newcomer, block: Block) -> list[Result]:
    statements = block.sql_statements()
    assert statements, f"{block.id}: a sql block with no statement"
    return [
        _run(newcomer, [".venv/bin/meterstream", "sql", sql], f"meterstream sql {sql!r}")
        for sql in statements
    ]


def check_yaml(newcomer: Newcomer, block: Block) -> list[Result]:
    doc = yaml.safe_load(block.text)
    assert isinstance(doc, dict) and len(doc) >= 1, f"{block.id}: not a YAML mapping"
    path = newcomer.scratch / f"example_{block.doc.replace('/', '_')}_{block.line}.yaml"
    path.write_text(block.text)
    if "meters" in doc:
        check = [".venv/bin/meterstream", "meters", "check", str(path)]
        return [_run(newcomer, check, "meterstream meters check")]
    if "plans" in doc:
        load_plans(path, load_meters(newcomer.root / "meters.example.yaml"))
        return []
    if list(doc) == ["stripe"]:
        StripeBlock.model_validate(doc["stripe"])
        return []
    raise AssertionError(f"{block.id}: no checker for a YAML block with keys {sorted(doc)}")


def check_json(newcomer: Newcomer, block: Block) -> list[Result]:
    raw = block.text.encode()
    doc = loads_exact(raw)
    event, problems = validate_document(doc, record_timestamp_ms=int(time.time() * 1000))
    problems += repeated_key_problems(raw, doc, event)
    assert not problems, f"{block.id}: the example event breaks the contract: {problems}"
    return []


RUNNERS = {
    "sh": run_sh,
    "python": run_python,
    "sql": run_sql,
    "yaml": check_yaml,
    "json": check_json,
}


@pytest.mark.parametrize(
    ("round_", "block"),
    [(r, b) for r in ROUNDS for b in RUNNABLE],
    ids=[f"{r}-{b.id}-{b.lang}" for r in ROUNDS for b in RUNNABLE],
)
def test_block(newcomer: Newcomer, round_: int, block: Block) -> None:
    assert newcomer.alive(), "the stack is gone:\n" + newcomer.context()
    results = RUNNERS[block.lang](newcomer, block)

    def shown(result: Result) -> str:
        return (
            f"{block.id} ({block.lang}, round {round_}): {result.what}\n{block.text}"
            f"--- exit {result.code}; stdout ---\n{result.stdout[-3000:]}"
            f"--- stderr ---\n{result.stderr[-3000:]}\n{newcomer.context()}"
        )

    for result in results:
        assert result.code == 0, shown(result)
    expected = block.expected()
    if expected:
        missing = missing_output(expected, "".join(r.stdout for r in results))
        assert not missing, f"expected output not printed: {missing}\n{shown(results[-1])}"


def test_ctrl_c_stops_the_stack_with_exit_0(newcomer: Newcomer) -> None:
    code = newcomer.stop()
    assert code == 0, f"exit {code}\n{newcomer.context()}"
    assert not (newcomer.state / "endpoints.json").exists()
