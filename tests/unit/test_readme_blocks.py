"""The README's blocks are all run or marked (no stack needed), and the reading and
matching that tests/integration/test_readme.py relies on."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tests.readme_blocks import DOCS, REPO, load, make_run_command, missing_output, parse


def test_every_block_of_the_docs_is_run_or_marked_with_a_reason() -> None:
    blocks, problems = load()
    assert not problems, "\n".join(problems)
    readme = Counter(b.lang for b in blocks if b.doc == "README.md" and b.runnable)
    assert readme["sh"] >= 3 and readme["python"] >= 1 and readme["sql"] >= 1, readme
    assert {b.doc for b in blocks} == set(DOCS)


def test_an_unmarked_block_of_another_language_is_a_problem(tmp_path: Path) -> None:
    text = "Intro\n\n```\nsome tree\n```\n\n```sh\necho hi\n```\n"
    blocks, problems = parse("X.md", text)
    assert [b.lang for b in blocks] == ["", "sh"]
    (tmp_path / "X.md").write_text(text)
    _, all_problems = load(["X.md"], root=tmp_path)
    assert all_problems == [
        "X.md:3: a plain block, neither run (sh, python, sql, yaml, json) nor marked "
        "<!-- not run: why -->"
    ]
    assert not problems


def test_markers_need_a_reason_and_a_block() -> None:
    text = (
        "<!-- not run: needs a Docker engine -->\n```sh\ndocker compose up\n```\n\n"
        "<!-- not run: -->\n```sh\nmake run\n```\n\n"
        "<!-- not run: dangling -->\nsome prose\n\n"
        "<!-- not run needs a colon -->\n```sh\nx\n```\n"
    )
    blocks, problems = parse("X.md", text)
    assert blocks[0].not_run == "needs a Docker engine" and not blocks[0].runnable
    assert blocks[1].not_run == ""
    assert problems == [
        "X.md:6: a 'not run' marker must give its reason",
        "X.md:11: a 'not run' marker with no block",
        "X.md:14: malformed marker, write <!-- not run: why -->",
    ]
    assert blocks[2].not_run is None and blocks[2].runnable


def test_an_indented_block_in_a_list_loses_its_indentation() -> None:
    text = "- item:\n\n  ```sh\n  meterstream customers set a cus_1\n  ```\n"
    (block,), problems = parse("X.md", text)
    assert not problems
    assert (block.line, block.lang, block.text) == (3, "sh", "meterstream customers set a cus_1\n")


def test_expected_output_lines_and_sql_statements() -> None:
    sh = '```sh\ncurl x   # a comment\n# => {"accepted":1}\n# => 202\n```\n'
    (block,), _ = parse("X.md", sh)
    assert block.expected() == ['{"accepted":1}', "202"]
    sql = "```sql\n-- first\nSELECT 1;\n\n-- second\nSELECT 2\nFROM t;\n-- trailing note\n```\n"
    (block,), _ = parse("X.md", sql)
    assert block.sql_statements() == ["-- first\nSELECT 1", "-- second\nSELECT 2\nFROM t"]
    (block,), _ = parse("X.md", "```sql\nSELECT 3\n```\n")
    assert block.sql_statements() == ["SELECT 3"]


def test_expected_lines_match_in_order_with_wildcards() -> None:
    out = 'created\n{"accepted":1,"events":[{"idempotency_key":"req-17","generated":false}]}\n202\n'
    key = '{"accepted":1,"events":[{"idempotency_key":"req-...","generated":false}]}'
    assert missing_output([key, "202"], out) == []
    assert missing_output(["202", key], out) == [key]  # order matters
    assert missing_output(["422"], out) == ["422"]
    assert missing_output(["20"], out) == ["20"]  # whole lines, not substrings
    assert missing_output(["...accepted..."], out) == []


def test_the_stack_is_started_as_make_run_starts_it() -> None:
    command = make_run_command((REPO / "Makefile").read_text())
    assert command[:2] == [".venv/bin/meterstream", "run"] and "--demo" in command, command
    assert "--duration" not in command  # a newcomer's `make run` runs until Ctrl-C
