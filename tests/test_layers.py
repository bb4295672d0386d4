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


# -- the `cogft` command (finetune/cogft/) is an application of the family interface ----------------
DYNAMIC_IMPORTS = {"import_module", "__import__", "get_class", "get_method", "get_object", "locate", "find_spec"}


def interface_names() -> set[str]:
    """What `finetune.family.ModelFamily` declares (methods, properties, class attributes), read from its source, plus
    what every nn.Module has (`eval`, `to`, ...)."""
    tree = ast.parse((REPO / "finetune" / "family.py").read_text(encoding="utf-8"))
    (cls,) = [node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "ModelFamily"]
    names = set()
    for node in cls.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {target.id for target in node.targets if isinstance(target, ast.Name)}
    return names | {"eval", "train", "to", "cpu", "cuda", "parameters", "state_dict", "load_state_dict"}


def is_family(node) -> bool:
    """`family`, `module.family`, `family_class(...)`: the expressions the command holds a family (or its class) in."""
    if isinstance(node, ast.Name):
        return node.id == "family"
    if isinstance(node, ast.Attribute):
        return node.attr == "family"
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "family_class"


def cli_trees():
    for path in sorted((REPO / "finetune" / "cogft").rglob("*.py")):
        yield path.relative_to(REPO), ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def test_the_cli_imports_no_family_module_by_name():
    found = []
    for path, tree in cli_trees():
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and {"recipes", "datamodules"} & (
                    {a.name.split(".")[0] for a in node.names} if isinstance(node, ast.Import)
                    else {(node.module or "").split(".")[0]}):
                found.append(f"{path}:{node.lineno} imports {ast.unparse(node)}")
            elif isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                literal = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
                if name in DYNAMIC_IMPORTS and any(v.split(".")[0] in ("recipes", "datamodules") for v in literal):
                    found.append(f"{path}:{node.lineno} {ast.unparse(node)}")
    assert not found, "the cogft command names a family's module (build families from conf/model/*.yaml): " + \
        "; ".join(found)


def test_the_cli_speaks_only_the_family_interface():
    """No hasattr/getattr in the command (what a family can do is a method of the interface, with a default), and
    every attribute it reads of a family is one `ModelFamily` declares."""
    interface = interface_names()
    found = []
    for path, tree in cli_trees():
        for node in ast.walk(tree):
            called = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
            if called in ("hasattr", "getattr"):
                found.append(f"{path}:{node.lineno} {ast.unparse(node)}")
            elif isinstance(node, ast.Attribute) and is_family(node.value) and node.attr not in interface:
                found.append(f"{path}:{node.lineno} {ast.unparse(node)} (not in ModelFamily)")
    assert not found, "the cogft command reaches past the family interface: " + "; ".join(found)


def test_the_engine_asks_a_family_only_through_the_interface():
    """Nowhere in finetune/ does the engine probe a family with hasattr/getattr: what a family may do is a method of
    `ModelFamily` with a default."""
    found = []
    for path in sorted((REPO / "finetune").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            called = node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
            if called in ("hasattr", "getattr") and node.args and is_family(node.args[0]):
                found.append(f"{path.relative_to(REPO)}:{node.lineno} {ast.unparse(node)}")
    assert not found, "the engine probes a family past its interface: " + "; ".join(found)


def test_the_interface_check_sees_what_it_forbids():
    tree = ast.parse("def f(family, module):\n    family.pipe.save_pretrained('x')\n    hasattr(family, 'merge')\n"
                     "    module.family.merge_loras([])\n    family_class('cogvlm').lora_names\n")
    interface = interface_names()
    seen = [ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute) and is_family(n.value)]
    assert sorted(seen) == ["family.pipe", "family_class('cogvlm').lora_names", "module.family.merge_loras"]
    assert [s for s in seen if s.rsplit(".", 1)[1] not in interface] == ["family.pipe"]
