"""The code blocks of the README and of the documents it links to for examples, as
``tests/integration/test_readme.py`` runs them (pure: reading and matching, no I/O
beyond reading the files).

The convention, for whoever writes documentation here:

* Every fenced block is run, according to its language:

  ``sh``      bash with ``set -euo pipefail``, from the repository root (a copy),
              while ``meterstream run`` runs there as ``make run`` starts it;
  ``python``  ``.venv/bin/python``, from the same place;
  ``sql``     each statement through ``.venv/bin/meterstream sql``;
  ``yaml``    checked by the loader its top-level key names (``meters:`` by
              ``meterstream meters check``, ``plans:`` by the plans loader,
              ``stripe:`` as a meter's stripe block);
  ``json``    each object checked against the event contract.

* A block that cannot run by nature (it starts a stack that blocks, needs a Docker
  engine or a ClickHouse server, is a directory tree...) says so on the line before
  its fence: ``<!-- not run: <the reason> -->``. A block with no language, or a
  language not above, must have that marker; a block neither run nor marked fails
  the test, and so does a marker with no reason or with no block after it.

* ``# => text`` lines in a ``sh`` or ``python`` block are what the block prints
  (standard output). They must appear in that order among its output lines, each
  line equal to one of them; ``...`` in an expected line stands for any text.
  Output shown any other way (a comment such as ``# e.g. ...``) is illustrative and
  not checked. (``# =>`` because ``make lint`` formats the README's python blocks
  with ruff, which would turn a ``#>`` into ``# >``.)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The README, and the documents it links to for examples. bench/README.md is the
# benchmark's lab notebook (its commands are benchmark runs of minutes to an hour,
# measured by hand and recorded with their commits), so it is not among them.
DOCS = (
    "README.md",
    "sinks/stripe/FORWARDING.md",
    "sinks/clickhouse/SCHEMA.md",
    "deploy/README.md",
)
RUN = ("sh", "python", "sql")
CHECK = ("yaml", "json")

_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<info>[^`]*)$")
_MARKER = re.compile(r"^[ \t]*<!--\s*not run:(?P<reason>.*?)-->\s*$")
_ANY_MARKER = re.compile(r"^[ \t]*<!--\s*not run\b")
_EXPECTED = re.compile(r"^[ \t]*# => ?(?P<text>.*)$")


@dataclass(frozen=True)
class Block:
    """One fenced block: where it is, its language, its text, why it is not run."""

    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    text: str  # the fence's indentation removed
    not_run: str | None = None  # the marker's reason

    @property
    def id(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runnable(self) -> bool:
        return self.not_run is None and self.lang in RUN + CHECK

    def expected(self) -> list[str]:
        """The ``# =>`` lines (what the block prints), in order."""
        if self.lang not in ("sh", "python"):
            return []
        found = (_EXPECTED.match(line) for line in self.text.splitlines())
        return [m["text"].rstrip() for m in found if m]

    def sql_statements(self) -> list[str]:
        """The statements of a ``sql`` block, split at a ``;`` that ends a line."""
        statements, current = [], []
        for line in self.text.splitlines():
            current.append(line)
            if line.rstrip().endswith(";"):
                statements.append("\n".join(current).strip().removesuffix(";").strip())
                current = []
        rest = "\n".join(current).strip()
        if rest and not all(s.strip().startswith("--") for s in current if s.strip()):
            statements.append(rest)
        return statements


def parse(doc: str, text: str) -> tuple[list[Block], list[str]]:
    """The blocks of one Markdown document, and the problems of its markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: tuple[int, str] | None = None  # a marker waiting for its block
    i = 0
    while i < len(lines):
        line = lines[i]
        fence = _FENCE.match(line)
        if fence is None:
            marker = _MARKER.match(line)
            if marker is not None:
                if pending is not None:
                    problems.append(f"{doc}:{pending[0]}: a 'not run' marker with no block")
                pending = (i + 1, marker["reason"].strip())
            elif _ANY_MARKER.match(line):
                problems.append(f"{doc}:{i + 1}: malformed marker, write <!-- not run: why -->")
            elif line.strip() and pending is not None:
                problems.append(f"{doc}:{pending[0]}: a 'not run' marker with no block")
                pending = None
            i += 1
            continue
        indent, lang = fence["indent"], fence["info"].strip().split(" ")[0]
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not re.match(rf"^{re.escape(indent)}```\s*$", lines[i]):
            body.append(lines[i].removeprefix(indent))
            i += 1
        if i == len(lines):
            problems.append(f"{doc}:{start + 1}: a block that is never closed")
        reason = None
        if pending is not None:
            reason = pending[1]
            if not reason:
                problems.append(f"{doc}:{pending[0]}: a 'not run' marker must give its reason")
            pending = None
        blocks.append(Block(doc, start + 1, lang, "\n".join(body) + "\n", reason))
        i += 1
    if pending is not None:
        problems.append(f"{doc}:{pending[0]}: a 'not run' marker with no block")
    return blocks, problems


def unclassified(blocks: Iterable[Block]) -> list[str]:
    """Blocks that are neither run nor marked."""
    return [
        f"{b.id}: a {b.lang or 'plain'} block, neither run ({', '.join(RUN + CHECK)}) "
        "nor marked <!-- not run: why -->"
        for b in blocks
        if b.not_run is None and b.lang not in RUN + CHECK
    ]


def load(docs: Iterable[str] = DOCS, root: Path = REPO) -> tuple[list[Block], list[str]]:
    """Every block of ``docs`` in document order, and every problem of the convention."""
    blocks: list[Block] = []
    problems: list[str] = []
    for doc in docs:
        found, doc_problems = parse(doc, (root / doc).read_text())
        blocks += found
        problems += doc_problems
    return blocks, problems + unclassified(blocks)


def make_run_command(makefile: str) -> list[str]:
    """What ``make run`` runs (its recipe, ``$(BIN)`` as ``.venv/bin``, no DURATION)."""
    lines = makefile.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("run:"))
    recipe = lines[start + 1]
    assert recipe.startswith("\t$(BIN)/meterstream run"), recipe
    command = re.sub(r"\$\(if [^)]*\(DURATION\)[^)]*\)[^)]*\),?\)", "", recipe.strip())
    assert "$(" not in command.replace("$(BIN)", ""), command
    return command.replace("$(BIN)", ".venv/bin").split()


def _line_matches(expected: str, actual: str) -> bool:
    pattern = ".*".join(re.escape(part) for part in expected.split("..."))
    return re.fullmatch(pattern, actual) is not None


def missing_output(expected: list[str], stdout: str) -> list[str]:
    """The expected lines not found, in order, among ``stdout``'s lines (empty: all were)."""
    actual = [line.rstrip() for line in stdout.splitlines()]
    at = 0
    for n, line in enumerate(expected):
        while at < len(actual) and not _line_matches(line, actual[at]):
            at += 1
        if at == len(actual):
            return expected[n:]
        at += 1
    return []
