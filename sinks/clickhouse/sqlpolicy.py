"""What read-only SQL may do, decided from ClickHouse's own parse of the statement.

``readonly=1`` stops writes to tables and table functions, but not the scalar
``file()`` function nor ``SELECT ... INTO OUTFILE`` (embedded ClickHouse runs
as clickhouse-local, which writes the file itself). So before an analyst
statement runs, ClickHouse parses it (``EXPLAIN AST``, which parses and does
nothing else; :mod:`meterstream.sinks.clickhouse.analyst` runs it on a read-only
connection) and this module walks every node of that tree. No keyword or
regular expression over the SQL text decides anything.

Allowed (everything else is refused with the reason):

- one statement: ``SELECT`` (with ``WITH``, ``UNION``, ``INTERSECT``,
  ``EXCEPT``, subqueries, joins, window functions); ``EXPLAIN`` of such a
  SELECT (plan, pipeline, syntax, AST, query tree, estimate); ``DESCRIBE``
  of an allowed table or such a SELECT; ``SHOW TABLES``/``DATABASES``/
  ``COLUMNS``/``PROCESSLIST``; ``SHOW CREATE TABLE``/``VIEW`` of an allowed
  table;
- no ``INTO OUTFILE`` (any form: ``APPEND``, ``TRUNCATE``, ``AND STDOUT``,
  ``COMPRESSION``), no ``SETTINGS`` clause, no ``FORMAT`` but the client's
  own, no query parameters, no ``APPLY(function)`` column transformer;
- functions from :mod:`meterstream.sinks.clickhouse.sqlfunctions` (an allow-list, in the
  letter case ClickHouse accepts, aggregate combinators on allowed
  aggregates); table functions ``numbers``, ``values``, ``generateSeries``;
- tables of the configured database, a few ``system`` tables of metadata and
  counters, and ``information_schema`` views of the same (``IN db.table``
  reads a table too, and is checked as one).

``EXPLAIN AST`` prints the tree's children, and a ``UNION DISTINCT`` of
parenthesised SELECTs keeps its ``INTO OUTFILE`` out of them (measured on chdb
26.9: the dump shows no output file, the query writes one). So the output file
is also looked for in ClickHouse's own formatting of the same parse
(``formatQuerySingleLine``: one canonical line, no comments, every string
single-quoted), by :func:`into_outfile`.

The ``EXPLAIN AST`` text prints one node per line, indented one space per
level, with ``(children N)``. An identifier with a line break in it prints
that line break as is, so the dump is checked as a tree: every node must
have exactly the children it declares, which a name cannot fake (a forged
line adds a child to a real node, whose count then no longer matches).
:func:`single_statement` also refuses control characters and escapes in
quoted names before anything is parsed.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from meterstream.errors import AstDumpError, StatementError
from meterstream.sinks.clickhouse import sqlfunctions as fn
from meterstream.sinks.clickhouse.sqltext import quote_end, split_statements

_LINE = re.compile(r"^( *)(\S.*?)(?: \(children (\d+)\))?\s*$")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_TABLE_NAME = re.compile(r"^([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?$")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
MAX_NODES = 100_000
CLIENT_FORMAT = "Native"  # the FORMAT clickhouse-connect appends to every query

IN_FUNCTIONS = frozenset(
    {
        "in",
        "notIn",
        "globalIn",
        "globalNotIn",
        "nullIn",
        "notNullIn",
        "globalNullIn",
        "globalNotNullIn",
    }
)
EXPLAIN_KINDS = frozenset(
    {
        "EXPLAIN",
        "EXPLAIN PLAN",
        "EXPLAIN PIPELINE",
        "EXPLAIN SYNTAX",
        "EXPLAIN AST",
        "EXPLAIN QUERY TREE",
        "EXPLAIN ESTIMATE",
    }
)
# Node kinds of the statements allowed at the top.
ROOTS = frozenset(
    {
        "SelectWithUnionQuery",
        "Explain",
        "DescribeQuery",
        "ShowProcesslistQuery",
        "ShowTables",
        "ShowColumns",
        "ShowCreateTableQuery",
        "ShowCreateViewQuery",
    }
)
# Node kinds that may appear anywhere below (their own rules are in _visit).
NODES = frozenset(
    {
        "SelectWithUnionQuery",
        "SelectIntersectExceptQuery",
        "SelectQuery",
        "Subquery",
        "ExpressionList",
        "TablesInSelectQuery",
        "TablesInSelectQueryElement",
        "TableExpression",
        "TableIdentifier",
        "TableJoin",
        "ArrayJoin",
        "SampleRatio",
        "OrderByElement",
        "InterpolateElement",
        "WithElement",
        "WindowDefinition",
        "WindowListElement",
        "Function",
        "Identifier",
        "Literal",
        "Asterisk",
        "QualifiedAsterisk",
        "ColumnsRegexpMatcher",
        "ColumnsListMatcher",
        "QualifiedColumnsRegexpMatcher",
        "QualifiedColumnsListMatcher",
        "ColumnsTransformerList",
        "ColumnsExceptTransformer",
        "ColumnsReplaceTransformer",
        "ColumnsReplaceTransformer::Replacement",
    }
)
REFUSED_NODES = {
    "Set": "a SETTINGS clause (or EXPLAIN options) is not allowed: limits are the operator's",
    "QueryParameter": "query parameters ({name:Type}) are not supported",
    "ColumnsApplyTransformer": "APPLY(function) is not supported: call the function directly",
}
OUTFILE_REFUSED = "INTO OUTFILE (and COMPRESSION) is not allowed: read-only SQL writes no file"
# Statements with an output (FORMAT, INTO OUTFILE, SETTINGS, COMPRESSION hang off them).
OUTPUT_NODES = frozenset(ROOTS)


@dataclass
class AstNode:
    """One line of ``EXPLAIN AST``: ``kind`` is its first word, ``text`` the rest."""

    kind: str
    text: str
    declared: int
    line: int
    children: list[AstNode] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The function / table / identifier name: ``text`` before an ``(alias ...)``."""
        return self.text.partition(" (alias ")[0]

    def walk(self) -> list[AstNode]:
        out, stack = [], [self]
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(reversed(node.children))
        return out


def parse_ast(lines: Sequence[str]) -> AstNode:
    """The tree printed by ``EXPLAIN AST``, or AstDumpError when it is not exactly one

    tree whose every node has the number of children it declares.
    """
    if not lines:
        raise AstDumpError("empty EXPLAIN AST output")
    if len(lines) > MAX_NODES:
        raise AstDumpError(f"more than {MAX_NODES} nodes")
    stack: list[tuple[int, AstNode]] = []
    root: AstNode | None = None
    for number, raw in enumerate(lines, 1):
        match = _LINE.match(raw)
        if match is None:
            raise AstDumpError(f"line {number} is not a node: {raw[:80]!r}")
        indent, body, count = len(match.group(1)), match.group(2), match.group(3)
        kind, _, text = body.partition(" ")
        node = AstNode(kind, text.strip(), int(count) if count else 0, number)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        if not stack:
            if root is not None or indent != 0:
                raise AstDumpError(f"line {number}: a second top-level node")
            root = node
        else:
            parent_indent, parent = stack[-1]
            if indent != parent_indent + 1:
                raise AstDumpError(f"line {number}: indented {indent}, parent {parent_indent}")
            parent.children.append(node)
        stack.append((indent, node))
    assert root is not None
    for node in root.walk():
        if len(node.children) != node.declared:
            raise AstDumpError(
                f"line {node.line} ({node.kind}) declares {node.declared} children,"
                f" has {len(node.children)}"
            )
    return root


@dataclass(frozen=True)
class Policy:
    """The database analysts read; everything else comes from :mod:`sqlfunctions`."""

    database: str
    table_functions: frozenset[str] = fn.TABLE_FUNCTIONS
    system_tables: frozenset[str] = fn.SYSTEM_TABLES
    information_schema_tables: frozenset[str] = fn.INFORMATION_SCHEMA_TABLES


_EXACT: dict[str, str] = {
    **{name: "scalar" for name in fn.SCALAR_FUNCTIONS | fn.EXTRA_FUNCTIONS},
    **{name: "aggregate" for name in fn.AGGREGATE_FUNCTIONS},
}
_ANY_CASE = {name.lower(): _EXACT[name] for name in fn.CASE_INSENSITIVE if name in _EXACT}


def function_allowed(name: str) -> bool:
    """An allowed scalar/aggregate function, in a letter case ClickHouse accepts, or an

    allowed aggregate with combinators (``sumIf``, ``uniqExactOrNull``, ``sumMap``...).
    """
    if not _NAME.match(name):
        return False
    if _known(name) is not None:
        return True
    base = name
    while True:
        suffix = next((c for c in fn.COMBINATORS if base.endswith(c) and base != c), None)
        if suffix is None:
            return False
        base = base[: -len(suffix)]
        if _known(base) == "aggregate":
            return True


def _known(name: str) -> str | None:
    kind = _EXACT.get(name)
    if kind is None and name.lower() in _ANY_CASE:
        kind = _ANY_CASE[name.lower()]
    return kind


def table_problem(name: str, policy: Policy, what: str = "table") -> str | None:
    """Why ``name`` (``t`` or ``db.t`` as printed by EXPLAIN AST) may not be read, or None."""
    match = _TABLE_NAME.match(name)
    if match is None:
        return f"{what} {name!r}: only plain names ([A-Za-z0-9_], db.table) are allowed"
    database, table = match.group(1), match.group(2)
    if table is None or database == policy.database:
        return None  # the configured database (the client's current one), or a WITH name
    if database == "system" and table in policy.system_tables:
        return None
    if database.lower() == "information_schema" and table in policy.information_schema_tables:
        return None
    return (
        f"{what} {name} is not readable: read-only SQL reads the database"
        f" {policy.database!r}, information_schema and the system tables "
        + ", ".join(sorted(policy.system_tables))
    )


def check_ast(root: AstNode, policy: Policy) -> list[str]:
    """Every reason ``root`` may not run (empty: allowed)."""
    problems: list[str] = []
    if root.kind not in ROOTS:
        problems.append(
            f"only SELECT, EXPLAIN, DESCRIBE and SHOW TABLES/COLUMNS/CREATE/PROCESSLIST are"
            " allowed;"
            f" got {root.kind}"
        )
        return problems
    _visit(root, policy, problems)
    return list(dict.fromkeys(problems))  # each reason once, in order


def _visit(node: AstNode, policy: Policy, problems: list[str]) -> None:
    kind = node.kind
    if kind in REFUSED_NODES:
        problems.append(REFUSED_NODES[kind])
        return
    if kind not in NODES and kind not in ROOTS:
        problems.append(f"{kind} is not allowed in read-only SQL")
        return
    children = node.children
    if kind in OUTPUT_NODES:
        children = _output_children(node, problems)
    if kind == "Explain":
        if node.text not in EXPLAIN_KINDS:
            problems.append(f"{node.text} is not allowed (EXPLAIN [PLAN|PIPELINE|SYNTAX|AST|...])")
            return
        if len(children) != 1 or children[0].kind != "SelectWithUnionQuery":
            problems.append("EXPLAIN takes one SELECT")
            return
    elif kind in ("ShowCreateTableQuery", "ShowCreateViewQuery"):
        names = [c.name for c in children]
        if not names or len(names) > 2 or any(c.kind != "Identifier" for c in children):
            problems.append("SHOW CREATE takes one table name")
            return
        problem = table_problem(".".join(names), policy)
        if problem:
            problems.append(problem)
        return
    elif kind in ("ShowTables", "ShowColumns", "ShowProcesslistQuery"):
        # Lists names from system tables (tables, databases, columns); the only
        # children are the FROM database and the format, both names.
        if any(c.kind != "Identifier" for c in children):
            problems.append(f"{kind}: unexpected clause")
        return
    elif kind == "DescribeQuery":
        if len(children) != 1 or children[0].kind != "TableExpression":
            problems.append("DESCRIBE takes one table or SELECT")
            return
    elif kind == "TableExpression":
        _table_expression(node, policy, problems)
        return
    elif kind == "TableIdentifier":
        problem = table_problem(node.name, policy)
        if problem:
            problems.append(problem)
        return
    elif kind == "Function":
        _function(node, policy, problems)
        return
    for child in children:
        _visit(child, policy, problems)


def _output_children(node: AstNode, problems: list[str]) -> list[AstNode]:
    """The children of a statement without its output clauses, which are checked here.

    After the statement's own parts come: ``INTO OUTFILE 'path'`` and
    ``COMPRESSION 'method'`` (Literals), ``FORMAT name`` (an Identifier) and
    ``SETTINGS`` (Set). A Literal or Set there is refused; the FORMAT may
    only be the client's own, on the outermost statement.
    """
    children = list(node.children)
    if any(c.kind == "Literal" for c in children):
        problems.append(OUTFILE_REFUSED)
    if any(c.kind == "Set" for c in children):
        problems.append(REFUSED_NODES["Set"])
    children = [c for c in children if c.kind not in ("Literal", "Set")]
    if node.kind.startswith("Show"):
        # Show nodes keep their names as Identifier children: the last one is the format.
        if children and children[-1].kind == "Identifier":
            if children[-1].name != CLIENT_FORMAT:
                problems.append(f"FORMAT {children[-1].name} is not allowed: the answer is JSON")
            children = children[:-1]
        return children
    formats = [c for c in children[1:] if c.kind == "Identifier"]
    for fmt in formats:
        if fmt.name != CLIENT_FORMAT:
            problems.append(f"FORMAT {fmt.name} is not allowed: the answer is JSON")
    return [c for c in children if c not in formats]


def _table_expression(node: AstNode, policy: Policy, problems: list[str]) -> None:
    """FROM / JOIN / DESCRIBE: a table, a table function or a subquery (+ SAMPLE)."""
    if not node.children:
        problems.append("empty table expression")
        return
    source, rest = node.children[0], node.children[1:]
    if source.kind == "Function":
        name = source.name
        if name not in policy.table_functions:
            allowed = ", ".join(sorted(policy.table_functions))
            problems.append(
                f"table function {name}() is not allowed (read-only SQL allows {allowed})"
            )
        for child in source.children:
            _visit(child, policy, problems)
    elif source.kind in ("TableIdentifier", "Subquery"):
        _visit(source, policy, problems)
    else:
        problems.append(f"{source.kind} is not allowed as a table")
    for child in rest:
        if child.kind != "SampleRatio":
            problems.append(f"{child.kind} is not allowed in a table expression")


def _function(node: AstNode, policy: Policy, problems: list[str]) -> None:
    name = node.name
    if not function_allowed(name):
        problems.append(f"function {name}() is not allowed in read-only SQL")
    args = node.children[0].children if node.children else []
    if name in IN_FUNCTIONS and len(args) == 2 and args[1].kind == "Identifier":
        problem = table_problem(args[1].name, policy, what="IN table")
        if problem:
            problems.append(problem)
    for child in node.children:
        _visit(child, policy, problems)


def into_outfile(canonical: str) -> bool:
    """True when ClickHouse's formatting of a statement (``formatQuerySingleLine``) has an

    ``INTO OUTFILE`` clause: the keywords, outside quoted strings and names.
    """
    words: list[str] = []
    i, n = 0, len(canonical)
    while i < n:
        ch = canonical[i]
        if ch in "'\"`":
            j = i + 1
            while j < n and canonical[j] != ch:
                j += 2 if canonical[j] == "\\" else 1
            words.append("")  # a literal or a quoted name breaks a keyword pair
            i = j + 1
        elif ch.isalpha() or ch == "_":
            j = i
            while j < n and (canonical[j].isalnum() or canonical[j] == "_"):
                j += 1
            words.append(canonical[i:j].upper())
            i = j
        else:
            if not ch.isspace():
                words.append("")
            i += 1
    return any(a == "INTO" and b == "OUTFILE" for a, b in itertools.pairwise(words))


def single_statement(sql: str) -> str:
    """The one statement in ``sql`` (a trailing ``;`` is fine), or StatementError.

    Refuses several statements, control characters (other than tab and line
    breaks) anywhere, and backslashes or line breaks inside quoted names
    (`` `...` `` and ``"..."``): no analyst needs them, and a line break in a
    name is printed as is by ``EXPLAIN AST``.
    """
    if _CONTROL.search(sql):
        raise StatementError("control characters are not allowed in SQL")
    statements = split_statements(sql)
    if len(statements) != 1:
        raise StatementError(f"read-only SQL takes exactly one statement, got {len(statements)}")
    statement = statements[0]
    for quoted in _quoted_names(statement):
        if "\\" in quoted or "\n" in quoted or "\r" in quoted or "\t" in quoted:
            raise StatementError(
                "quoted names may not contain backslashes or line breaks: " + quoted[:60]
            )
    return statement


def _quoted_names(sql: str) -> list[str]:
    """The `` `...` `` and ``"..."`` tokens of ``sql`` (strings and comments skipped)."""
    names: list[str] = []
    i, n = 0, len(sql)
    while i < n:
        ch = sql[i]
        if ch in "'\"`":
            j = quote_end(sql, i)
            if ch != "'":
                names.append(sql[i : j + 1])
            i = j + 1
        elif sql.startswith("--", i) or ch == "#":
            j = sql.find("\n", i)
            i = n if j < 0 else j
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            i += 1
    return names
