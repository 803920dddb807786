"""Lay out build/lint/: the installed import names as a tree of links to the folders' files.

The repository keeps the card's folders (pipeline/, sinks/, topics/); the installation
maps them to one import name (pyproject.toml, ``[tool.setuptools] package-dir``):
``meterstream``, ``meterstream.sinks``, ``meterstream.topics``. An editable install
reaches them through an import hook that static tools do not run, so mypy and
import-linter read this tree instead: one real directory per package, one relative
symlink per module, laid anew on every ``make lint`` (a new module needs no step).
It fails if a folder with an ``__init__.py`` under a mapped folder is not in
``[tool.setuptools] packages``: a package left off that list would be missing from
the wheel and the image while the editable install still finds it.

    python tools/lint_tree.py [OUT]      # default build/lint
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_folders() -> dict[str, Path]:
    """Every installed package and the folder it comes from."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping: dict[str, str] = setup["package-dir"]
    folders = {}
    for package in setup["packages"]:
        base = max(
            (name for name in mapping if package == name or package.startswith(name + ".")), key=len
        )
        rest = package.removeprefix(base).strip(".")
        folders[package] = ROOT / mapping[base] / rest.replace(".", "/")
    return folders


def unlisted(folders: dict[str, Path]) -> list[str]:
    """Package folders under the mapped roots that the packages list leaves out."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(folders.values())
    missing = []
    for root in setup["package-dir"].values():
        for init in sorted((ROOT / root).rglob("__init__.py")):
            if init.parent not in listed:
                missing.append(str(init.parent.relative_to(ROOT)))
    return missing


def lay_out(out: Path) -> int:
    shutil.rmtree(out, ignore_errors=True)
    count = 0
    for package, folder in package_folders().items():
        target = out / package.replace(".", "/")
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted(folder.glob("*.py")) + sorted(folder.glob("*.pyi")):
            link = target / source.name
            link.symlink_to(
                Path(*[".."] * len(target.relative_to(ROOT).parts), source.relative_to(ROOT))
            )
            count += 1
    return count


if __name__ == "__main__":
    if missing := unlisted(package_folders()):
        sys.exit(f"pyproject.toml [tool.setuptools] packages leaves out: {', '.join(missing)}")
    out = (ROOT / (sys.argv[1] if len(sys.argv) > 1 else "build/lint")).resolve()
    print(f"lint tree: {lay_out(out)} modules in {out.relative_to(ROOT)}")
