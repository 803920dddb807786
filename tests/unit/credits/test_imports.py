"""The credits package stays pure: the standard library and meterstream.errors, nothing else."""

import ast
import sys
from pathlib import Path

import meterstream.credits

PACKAGE = Path(meterstream.credits.__file__).parent
ALLOWED_PROJECT = {"meterstream.errors"}


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_only_the_standard_library_pipeline_errors_and_itself() -> None:
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 10
    for path in files:
        for name in imported_modules(path):
            top = name.split(".")[0]
            if name.startswith("meterstream.credits") or name in ALLOWED_PROJECT:
                continue
            assert top in sys.stdlib_module_names and top != "meterstream", (
                f"{path.name} imports {name}"
            )
