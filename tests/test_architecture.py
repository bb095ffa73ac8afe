"""The layering of ARCHITECTURE.md: no import cycles, and no module imports a layer above it."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def import_graph() -> dict[str, set[str]]:
    mods = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for pkg in ("harness", "models") for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for n in ast.walk(ast.parse(p.read_text())):
            if isinstance(n, ast.Import):
                names = [a.name for a in n.names]
            elif isinstance(n, ast.ImportFrom) and n.module and not n.level:
                names = [n.module] + [f"{n.module}.{a.name}" for a in n.names]
            else:
                continue
            graph[m] |= {t for t in names if t in mods and t != m and not m.startswith(t + ".")}
    return graph


def reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted({tuple(sorted((a, b))) for a in graph for b in graph[a] if a in reach(graph, b)})
    assert not cycles


def test_layers_import_only_downwards():
    graph = import_graph()
    above = {
        "harness.stats": {"harness.report", "harness.tables", "harness.experiments", "harness.tune", "harness.cli",
                          "harness.kinds", "harness.store"},
        "harness.stopping": {"harness.train", "harness.runs", "harness.store", "harness.studies", "harness.tune",
                             "harness.experiments", "harness.cli"},
        "harness.report": {"harness.experiments", "harness.tune", "harness.cli", "harness.kinds", "harness.store"},
        "harness.tables": {"harness.report", "harness.experiments", "harness.tune", "harness.cli"},
        "harness.store": {"harness.tune", "harness.experiments", "harness.cli", "harness.studies", "harness.report"},
        "harness.runs": {"harness.store", "harness.studies", "harness.tune", "harness.experiments", "harness.cli"},
        "harness.train": {"harness.runs", "harness.store", "harness.tune", "harness.experiments", "harness.cli"},
    }
    for module, forbidden in above.items():
        assert not reach(graph, module) & forbidden, (module, reach(graph, module) & forbidden)
    for module in graph:
        if module.startswith("models"):  # models are pure torch: nothing of the harness
            assert not {m for m in graph[module] if m.startswith("harness")}, module


def test_models_build_linear_layers_from_the_padded_linear():
    """ARCHITECTURE.md: a model's linear layers are `models.base.Linear` (rows padded to a fixed
    grid under CPU bf16, so oneDNN's kernel cache stays bounded), never a bare `nn.Linear`."""
    bare = []
    for p in sorted((REPO / "models").glob("*.py")):
        for n in ast.walk(ast.parse(p.read_text())):
            if (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "Linear"
                    and isinstance(n.func.value, ast.Name) and n.func.value.id == "nn"):
                bare.append(f"{p.name}:{n.lineno}")
    assert not bare, bare
