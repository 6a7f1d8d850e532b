"""The package's architecture, checked: no import circles inside ``fewstep/``, imports only point down.

Every import counts, also the ones inside functions (a lazy import is still a dependency).
Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b``; those implicit edges are not
counted (every ``__init__`` here is lazy or re-exports its own subpackage).
"""

from __future__ import annotations

import ast
from pathlib import Path

import fewstep

# The layer order, lowest first: a module may import its own layer and the layers below it.
LAYERS = [
    ("ground floor", ["fewstep._extras", "fewstep._version", "fewstep.config", "fewstep.infra"]),
    ("kernels", ["fewstep.kernels"]),
    ("samplers", ["fewstep.samplers"]),
    ("metrics", ["fewstep.eval.metrics"]),  # metric code knows nothing of models: below the zoo
    ("zoo", ["fewstep.zoo"]),
    ("eval", ["fewstep.eval"]),
    ("tuning", ["fewstep.tuning"]),
    ("distill", ["fewstep.distill"]),
    ("command line", ["fewstep.cli", "fewstep.__main__", "fewstep"]),
]

ROOT = Path(fewstep.__file__).parent


def _modules() -> dict[str, Path]:
    mods = {}
    for path in ROOT.rglob("*.py"):
        parts = ("fewstep",) + path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # ``from a import b`` names module a.b if there is one, else a name defined in a
            targets = [f"{module}.{alias.name}" if f"{module}.{alias.name}" in mods else module for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in mods and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, mods) for name, path in mods.items()}


def _layer(module: str) -> int:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_imports_point_down():
    upward = [
        f"{a} ({LAYERS[_layer(a)][0]}) imports {b} ({LAYERS[_layer(b)][0]})"
        for a, targets in sorted(_graph().items())
        for b in sorted(targets)
        if _layer(b) > _layer(a)
    ]
    assert upward == []


def test_the_checks_see_a_circle_and_an_upward_import():
    graph = {"fewstep.samplers.a": {"fewstep.samplers.b"}, "fewstep.samplers.b": {"fewstep.samplers.a"},
             "fewstep.zoo.x": set()}
    assert _cycles(graph) == [["fewstep.samplers.a", "fewstep.samplers.b"]]
    assert _layer("fewstep.eval.metrics.fd") < _layer("fewstep.zoo.digits") < _layer("fewstep.eval.runner")
    assert _layer("fewstep.infra.io") == 0 and _layer("fewstep") == len(LAYERS) - 1
