"""The checks of ``POST /v1/meters/diff``'s body (pipeline/api/routes/meters.py): every
problem of both documents with its path, YAML aliases refused, times required."""

from __future__ import annotations

from meterstream.api.routes.meters import _config, _time

GOOD = "meters:\n  - {name: calls, event_name: api, aggregation: count}\n"


def test_a_valid_document_is_read() -> None:
    problems: list[str] = []
    config = _config({"old": GOOD}, "old", problems)
    assert problems == [] and config is not None
    assert [m.name for m in config.meters] == ["calls"]


def test_every_problem_is_said_with_its_side_and_path() -> None:
    problems: list[str] = []
    body = {
        "new": "meters:\n  - {name: calls, event_name: api, aggregation: count,"
        " versions: [{effective_until: 2026-12-01T00:30:00Z}]}\n  - 5\n"
    }
    assert _config(body, "new", problems) is None
    assert problems == [
        "new: meters[0].versions[0].effective_until: 2026-12-01T00:30:00Z is not a window"
        " boundary of this meter (hour windows): a version ends where a window ends, so"
        " every window has one definition",
        "new: meters[1]: must be a mapping",
    ]


def test_aliases_syntax_errors_and_missing_documents_are_refused() -> None:
    problems: list[str] = []
    aliased = "x: &a [1, 2]\nmeters: [*a, *a]\n"
    assert _config({"old": aliased}, "old", problems) is None
    assert _config({"new": "meters: [\n"}, "new", problems) is None
    assert _config({}, "old", problems) is None
    assert problems[0] == "old: YAML anchors and aliases are not accepted here"
    assert problems[1].startswith("new: not YAML")
    assert problems[2] == "old: required, a meters YAML document as a string"


def test_times_are_required_and_checked() -> None:
    problems: list[str] = []
    assert _time({"from": "2026-12-01T00:00:00Z"}, "from", problems) == 1_796_083_200_000
    assert _time({"from": 5}, "from", problems) == 5
    assert problems == []
    for bad in (None, "", True, 1.5, "soon", -1):
        _time({"from": bad}, "from", problems)
    assert len(problems) == 6 and all(p.startswith("from: ") for p in problems)
