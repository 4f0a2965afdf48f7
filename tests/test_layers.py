"""The package's imports run downward only (function-local imports counted): the layers of README's "Layout"."""

import ast
from pathlib import Path

import networkx as nx

import mhc_rewrite

PACKAGE = Path(mhc_rewrite.__file__).parent

# top to bottom; a module may import its own layer or any layer below it, never one above
LAYERS = [
    ["__init__", "__main__"],
    ["cli"],
    ["inspect"],
    ["backend", "saving", "stages"],
    ["convert"],  # runs at conversion
    ["region"],  # runs at every call of a converted model
    ["pipeline"],
    ["passes"],
    ["site_params", "record"],
    ["config"],
    ["ops"],
    ["kernels"],
    ["trace", "specialisation", "kv_cache", "checkpointing", "sharding", "recompute", "paths", "constants", "errors"],
]
RANK = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts)


def _unit(module: str) -> str:
    """The layer unit of a module: its subpackage (``passes``), or itself (``convert``)."""
    return module.split(".")[0]


def _imports() -> nx.DiGraph:
    """Module -> module edges for every import of the package by itself, at any depth of the file."""
    graph = nx.DiGraph()
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    for name, path in modules.items():
        graph.add_node(name)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".") if package else []
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                elif node.module and node.module.startswith("mhc_rewrite"):
                    target = node.module.removeprefix("mhc_rewrite").lstrip(".")
                else:
                    continue
                # `from . import convert` names a module when one of that name exists
                names = [f"{target}.{a.name}".lstrip(".") for a in node.names]
                targets = [n for n in names if n in modules] or [target]
            elif isinstance(node, ast.Import):
                targets = [a.name.removeprefix("mhc_rewrite").lstrip(".") for a in node.names
                           if a.name.startswith("mhc_rewrite")]
            for target in targets:
                if target and target in modules and target != name:
                    graph.add_edge(name, target)
    return graph


def test_every_module_has_a_layer():
    units = {_unit(m) for m in _imports().nodes}
    assert units <= set(RANK), f"modules with no layer: {sorted(units - set(RANK))}"


def test_no_import_circle():
    cycles = list(nx.simple_cycles(_imports()))
    assert cycles == [], f"import circles: {cycles}"


def test_imports_run_downward():
    upward = [(a, b) for a, b in _imports().edges
              if RANK[_unit(a)] > RANK[_unit(b)] and _unit(a) != _unit(b)]
    assert upward == [], f"imports of a higher layer: {upward}"


def test_the_checker_sees_function_local_and_relative_imports(tmp_path, monkeypatch):
    """The checker itself, on a package with a known circle made by a function-local relative import."""
    pkg = tmp_path / "mhc_rewrite"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .high import g\n")
    (pkg / "high.py").write_text("from . import low\n")
    (pkg / "sub" / "__init__.py").write_text("from ..low import f\n")
    monkeypatch.setitem(globals(), "PACKAGE", pkg)
    graph = _imports()
    assert set(graph.edges) == {("low", "high"), ("high", "low"), ("sub", "low")}
    assert list(nx.simple_cycles(graph))
