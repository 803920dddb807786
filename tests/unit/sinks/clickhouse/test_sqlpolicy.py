"""The read-only SQL policy on golden EXPLAIN AST dumps (printed by chdb 26.9).

The same policy against ClickHouse's live parse, with many spellings per class,
is in tests/security/test_sql_policy.py.
"""

from __future__ import annotations

import pytest

from meterstream.errors import AstDumpError, StatementError
from meterstream.sinks.clickhouse.sqlpolicy import (
    Policy,
    check_ast,
    function_allowed,
    parse_ast,
    single_statement,
    table_problem,
)

POLICY = Policy("meterstream")

LAMBDA_FILE = """\
SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Function arrayMap (children 1)
     ExpressionList (children 2)
      Function lambda (children 1)
       ExpressionList (children 2)
        Function tuple (children 1)
         ExpressionList (children 1)
          Identifier x
        Function file (children 1)
         ExpressionList (children 1)
          Identifier x
      Literal Array_['/etc/passwd']
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function numbers (children 1)
       ExpressionList (children 1)
        Literal UInt64_1
 Identifier Native"""

UNION_OUTFILE = """\
SelectWithUnionQuery (children 3)
 ExpressionList (children 2)
  SelectQuery (children 1)
   ExpressionList (children 1)
    Literal UInt64_1
  SelectQuery (children 1)
   ExpressionList (children 1)
    Literal UInt64_2
 Literal '/tmp/x'
 Identifier Native"""

IN_SYSTEM_TABLE = """\
SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 4)
   ExpressionList (children 2)
    Identifier customer_id
    Function sumIf (children 1)
     ExpressionList (children 2)
      Identifier value
      Function greater (children 1)
       ExpressionList (children 2)
        Identifier x
        Literal UInt64_1
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      TableIdentifier usage_events
   Function in (children 1)
    ExpressionList (children 2)
     Identifier customer_id
     Identifier system.users
   ExpressionList (children 1)
    Identifier customer_id
 Identifier Native"""

DESCRIBE_FILE = """\
DescribeQuery (children 2)
 TableExpression (children 1)
  Function file (children 1)
   ExpressionList (children 2)
    Literal '/etc/passwd'
    Literal 'LineAsString'
 Identifier Native"""


def check(dump: str) -> list[str]:
    return check_ast(parse_ast(dump.splitlines()), POLICY)


def test_a_plain_select_passes() -> None:
    assert check(IN_SYSTEM_TABLE.replace("system.users", "usage_events")) == []


def test_a_function_inside_a_lambda_is_checked() -> None:
    assert check(LAMBDA_FILE) == ["function file() is not allowed in read-only SQL"]


def test_into_outfile_after_a_union_is_refused() -> None:
    assert check(UNION_OUTFILE) == [
        "INTO OUTFILE (and COMPRESSION) is not allowed: read-only SQL writes no file"
    ]


def test_in_a_table_of_another_database_is_refused() -> None:
    (problem,) = check(IN_SYSTEM_TABLE)
    assert problem.startswith("IN table system.users is not readable")


def test_describe_of_a_table_function_is_refused() -> None:
    assert check(DESCRIBE_FILE) == [
        "table function file() is not allowed"
        " (read-only SQL allows generateSeries, generate_series, numbers, values)"
    ]


def test_a_foreign_format_is_refused() -> None:
    dump = UNION_OUTFILE.replace(" Literal '/tmp/x'\n", "").replace("(children 3)", "(children 2)")
    assert check(dump) == []
    assert check(dump.replace("Identifier Native", "Identifier TabSeparated")) == [
        "FORMAT TabSeparated is not allowed: the answer is JSON"
    ]


@pytest.mark.parametrize(
    "dump",
    [
        "",
        " SelectWithUnionQuery (children 1)",  # indented root
        "SelectWithUnionQuery (children 1)\n ExpressionList\nLiteral 1",  # two roots
        "SelectWithUnionQuery (children 1)\n   ExpressionList",  # skips a level
        # A name with a line break forges a sibling: the real parent's count no longer fits.
        LAMBDA_FILE.replace("          Identifier x\n", "          Identifier x\n  Literal 1\n", 1),
        # ...or claims children under a node that declares none.
        UNION_OUTFILE.replace("Literal UInt64_1", "Literal UInt64_1\n     Literal 2", 1),
    ],
)
def test_a_dump_that_is_not_one_consistent_tree_is_an_error(dump: str) -> None:
    with pytest.raises(AstDumpError):
        parse_ast(dump.splitlines())


@pytest.mark.parametrize(
    "name",
    ["sum", "count", "COUNT", "Sum", "countIf", "countDistinct", "sumMap", "uniqExactIfOrNull",
     "quantilesExactMerge", "groupArrayArray", "toStartOfMonth", "JSONExtractString", "lambda",
     "DATE", "substr", "multiIf", "caseWithExpression", "arrayJoin", "in", "concat"],
)  # fmt: skip
def test_allowed_functions(name: str) -> None:
    assert function_allowed(name)


@pytest.mark.parametrize(
    "name",
    ["file", "FILE", "File", "fileCluster", "url", "s3", "remote", "executable", "input",
     "dictGet", "joinGet", "sleep", "sleepEachRow", "getSetting", "getServerSetting", "hostName",
     "addressToLine", "logTrace", "catboostEvaluate", "naiveBayesClassifier", "formatRow",
     "groupFormat", "chdb", "fileIf", "sleepIf", "Merge", "OrNull", "file x", "regionToName",
     "filesystemAvailable", "currentUser", "showCertificate", "generateRandom"],
)  # fmt: skip
def test_refused_functions(name: str) -> None:
    assert not function_allowed(name)


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("usage_events", True),
        ("meterstream.usage_events", True),
        ("system.tables", True),
        ("information_schema.columns", True),
        ("INFORMATION_SCHEMA.tables", True),
        ("system.processes", True),
        ("system.disks", False),
        ("system.server_settings", False),
        ("system.users", False),
        ("other.usage_events", False),
        ("my table", False),
        ("a.b.c", False),
    ],
)
def test_tables(name: str, ok: bool) -> None:
    assert (table_problem(name, POLICY) is None) is ok


def test_single_statement() -> None:
    assert single_statement("  SELECT 1;  -- done\n") == "SELECT 1"
    assert single_statement("SELECT ';' AS `semi;colon`") == "SELECT ';' AS `semi;colon`"
    for bad in [
        "SELECT 1; SELECT 2",
        "SELECT 1; DROP TABLE usage_events",
        "",
        "-- nothing",
        "SELECT 1\x00",
        "SELECT `a\n  Function file` FROM t",
        'SELECT "a\\nb"',
        "SELECT `x\\` FROM t",
    ]:
        with pytest.raises(StatementError):
            single_statement(bad)
