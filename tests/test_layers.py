"""The three packages import one way only: `datamodules/ -> finetune/ <- recipes/`.

The engine (`finetune/`) knows no model and no data source; a data module yields raw samples and knows no model;
a family knows no data module (what it needs of a sample reaches the data module as its `Processor`, handed over
by the engine). Read from the source (AST), nothing is imported.
"""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGES = ("finetune", "datamodules", "recipes")
ALLOWED = {"finetune": set(), "datamodules": {"finetune"}, "recipes": {"finetune"}}


def imported_packages(path) -> set[str]:
    """The kit's top-level packages a file imports (anywhere in it, lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue  # relative imports stay inside their package
        found |= {name.split(".")[0] for name in names} & set(PACKAGES)
    return found


def arrows() -> dict[tuple[str, str], list[str]]:
    """(from package, to package) -> the files that make that arrow."""
    graph: dict[tuple[str, str], list[str]] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            for target in imported_packages(path) - {package}:
                graph.setdefault((package, target), []).append(str(path.relative_to(REPO)))
    return graph


def test_imports_point_one_way():
    forbidden = {arrow: files for arrow, files in arrows().items() if arrow[1] not in ALLOWED[arrow[0]]}
    assert not forbidden, "imports against the layers: " + "; ".join(
        f"{a} -> {b} in {', '.join(files)}" for (a, b), files in sorted(forbidden.items()))


def test_the_walk_sees_lazy_and_nested_imports(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\n\ndef f():\n    from recipes.cogvideox.family import CogVideoX\n    import datamodules.video\n"
                      "from . import sibling\n")
    assert imported_packages(source) == {"recipes", "datamodules"}
