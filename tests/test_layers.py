"""The import graph is what docs/ARCHITECTURE.md draws: every part of cerbero_ray has a layer, a
module imports only from its own layer or below (lazy imports inside functions count too), no stage
imports another, config/ imports only the ground floor, and there is no import cycle between our
modules, same-layer ones included. Read from the source (ast), so a new import that breaks this
fails here, not in a review. The stages' layers come from the stage table."""

import ast
import os

from cerbero_ray.config import REPO_DIR
from cerbero_ray.config.stages import STAGES, Stage

ROOT = os.path.join(REPO_DIR, "cerbero_ray")
GROUND = {
    *("chat", "storage", "checkpoints", "shards", "inputs", "llamacpp", "logs", "adapters", "cluster", "tracking"),
    "cards",
}
CORE = {"config": 1, "tokenizer": 2, "models": 2, "inference": 3, "batchjob": 4, "runtime": 6, "submit": 6}


def layers(stages: dict[str, Stage] = STAGES) -> dict[str, int]:
    """{top-level part of cerbero_ray: its layer}: the ground floor, the core, each stage's package."""
    return {**{m: 0 for m in GROUND}, **CORE, **{s.package: s.layer for s in stages.values()}}


def module_files(root: str = ROOT) -> dict[str, str]:
    """{dotted module name: its file} for every module of the package under ``root``."""
    out = {}
    base = os.path.dirname(root)
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                parts = os.path.relpath(os.path.join(folder, f), base)[:-3].split(os.sep)
                out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = os.path.join(folder, f)
    return out


def module_imports(root: str = ROOT) -> dict[str, set[str]]:
    """{module: the modules of the package it imports}, at module level or inside functions;
    ``from pkg import name`` is an arrow to ``pkg.name`` when that is a module, else to ``pkg``."""
    files = module_files(root)
    top = os.path.basename(root)
    graph = {}
    for mod, path in files.items():
        seen = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == top:
                named = (f"{node.module}.{a.name}" for a in node.names)
                seen.update(m if m in files else node.module for m in named)
            elif isinstance(node, ast.Import):
                seen.update(a.name for a in node.names if a.name.split(".")[0] == top)
        seen.discard(mod)
    return graph


def part_imports(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The module graph folded to top-level parts (``cerbero_ray.train.loop`` -> ``train``)."""

    def part(m: str) -> str | None:
        bits = m.split(".")
        return bits[1] if len(bits) > 1 else None

    out: dict[str, set[str]] = {}
    for a, bs in graph.items():
        if part(a) is not None:
            out.setdefault(part(a), set()).update(p for p in map(part, bs) if p not in (None, part(a)))
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of ``graph``: its strongly connected components of more than one module
    (Tarjan), each sorted."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def violations(graph: dict[str, set[str]], layer: dict[str, int], stages: set[str]) -> list[str]:
    """Every arrow the layer rule forbids, as ``a -> b (why)``."""
    parts = part_imports(graph)
    bad = [f"{a} -> {b} (up a layer)" for a, bs in parts.items() for b in bs if layer[b] > layer[a]]
    bad += [f"{a} -> {b} (a stage imports another)" for a, bs in parts.items() for b in bs if {a, b} <= stages]
    bad += [f"config -> {b} (config imports only the ground floor)" for b in parts.get("config", ()) if layer[b]]
    bad += [" -> ".join(c) + " (a cycle)" for c in cycles(graph)]
    return sorted(bad)


def test_every_part_has_a_layer():
    parts = set(part_imports(module_imports())) | {m.split(".")[1] for m in module_files() if "." in m}
    assert parts == set(layers()), "a new module or package: give it a layer here (or in its stage's record)"


def test_the_tree_keeps_the_layer_rule_and_has_no_cycle():
    stages = {s.package for s in STAGES.values() if s.layer == 5}
    assert violations(module_imports(), layers(), stages) == []


def _write(root, rel: str, text: str) -> None:
    path = os.path.join(root, *rel.split("/"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_a_cycle_between_same_layer_modules_fails(tmp_path):
    """Two ground-floor modules importing each other, one of them inside a function: a cycle, which
    the layer rule alone lets through."""
    root = str(tmp_path / "cerbero_ray")
    _write(root, "__init__.py", "")
    _write(root, "storage.py", "def f():\n    from cerbero_ray.checkpoints import g\n")
    _write(root, "checkpoints.py", "from cerbero_ray import storage\n")
    _write(root, "chat.py", "from cerbero_ray import storage\n")
    graph = module_imports(root)
    assert cycles(graph) == [["cerbero_ray.checkpoints", "cerbero_ray.storage"]]
    assert violations(graph, {"storage": 0, "checkpoints": 0, "chat": 0}, set()) == [
        "cerbero_ray.checkpoints -> cerbero_ray.storage (a cycle)"
    ]
    _write(root, "storage.py", "")
    assert cycles(module_imports(root)) == []


def test_an_arrow_up_or_across_stages_fails(tmp_path):
    root = str(tmp_path / "cerbero_ray")
    _write(root, "__init__.py", "")
    _write(root, "storage.py", "")
    _write(root, "config/__init__.py", "def f():\n    from cerbero_ray.models import build\n")
    _write(root, "models.py", "from cerbero_ray import storage\n")
    _write(root, "label/__init__.py", "from cerbero_ray.train.loop import x\n")
    _write(root, "train/loop.py", "import cerbero_ray.storage\n")
    layer = {"storage": 0, "config": 1, "models": 2, "label": 5, "train": 5}
    assert violations(module_imports(root), layer, {"label", "train"}) == [
        "config -> models (config imports only the ground floor)",
        "config -> models (up a layer)",
        "label -> train (a stage imports another)",
    ]
