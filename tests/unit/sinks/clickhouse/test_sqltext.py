"""SQL text split into statements (sinks/clickhouse/sqltext.py)."""

from __future__ import annotations

from meterstream.sinks.clickhouse.sqltext import split_statements


def test_split_statements_ignores_semicolons_in_strings_and_comments() -> None:
    sql = (
        "-- header; with a semicolon\n"
        "CREATE TABLE a (s String DEFAULT ';') ENGINE = Memory;\n"
        "/* block ; comment */\n"
        "SELECT 'it\\'s; fine', \"x;y\", `c;d` FROM a -- trailing; comment\n"
        ";\n"
        "  ;  \n"
        "-- only a comment;\n"
    )
    assert split_statements(sql) == [
        "-- header; with a semicolon\nCREATE TABLE a (s String DEFAULT ';') ENGINE = Memory",
        "/* block ; comment */\nSELECT 'it\\'s; fine', \"x;y\", `c;d` FROM a -- trailing; comment",
    ]
