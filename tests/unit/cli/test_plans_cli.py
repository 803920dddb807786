"""``meterstream plans check``: every problem at once, exit 2; a good file is listed."""

from __future__ import annotations

from pathlib import Path

import pytest

from meterstream.cli.main import main

REPO = Path(__file__).resolve().parents[3]


def test_check_lists_every_problem_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("METERSTREAM_PLANS_FILE", raising=False)
    bad = tmp_path / "plans.yaml"
    bad.write_text(
        "plans:\n"
        "  - name: pro\n    currency: usx\n    base_fee: 0.001\n    prices:\n"
        "      - {meter: nope, unit_price: -1}\n"
        "      - {meter: ai_tokens, billing_scheme: tiered, tiers_mode: volume,"
        " tiers: [{up_to: 5}], transform_quantity: {divide_by: 0, round: sideways}}\n"
    )
    meters = str(REPO / "meters.example.yaml")
    assert main(["plans", "check", str(bad), "--meters", meters]) == 2
    err = capsys.readouterr().err
    for expected in (
        "plans[0].currency: 'usx' is not a currency",
        "plans[0].prices[0].unit_price: must not be negative",
        "plans[0].prices[1].tiers[0].up_to: the last tier must be unbounded",
        "plans[0].prices[1].transform_quantity.divide_by: must be a positive integer",
        "plans[0].prices[1].transform_quantity.round",
        "plans[0].prices[0].meter: no meter named 'nope'",
    ):
        assert expected in err, err


def test_check_the_example_file(capsys: pytest.CaptureFixture[str]) -> None:
    meters = str(REPO / "meters.example.yaml")
    assert main(["plans", "check", str(REPO / "plans.example.yaml"), "--meters", meters]) == 0
    out = capsys.readouterr().out
    assert "ok  servers_pro: usd; active_servers (graduated)" in out
    assert "ok  free_tier: usd; no prices; limit ai_tokens 10000/month" in out
    assert "8 plan(s), default plan default, no problems" in out
