"""The import graph has the layers docs/ARCHITECTURE.md draws, and no back-arrow: a module imports
only from its own layer's ground or below (lazy imports inside functions count too), no stage
imports another, and config/ imports only the ground floor. Read from the source (ast), so a new
import that breaks the layering fails here, not in a review."""

import ast
import os

from cerbero_ray.config import REPO_DIR

GROUND = {"chat", "storage", "checkpoints", "shards", "inputs", "llamacpp", "logs", "adapters"}
STAGES = {"data", "train", "label", "generate", "serve", "evaluate", "export"}
LAYER = {
    **{m: 0 for m in GROUND},
    "config": 1,
    "tokenizer": 2,
    "models": 2,
    "inference": 3,
    "batchjob": 4,
    **{m: 5 for m in STAGES},
    **{m: 6 for m in ("stages", "runtime", "submit", "recipe")},
}


def imports() -> dict[str, set[str]]:
    """{top-level part of cerbero_ray (a module or a package): the parts it imports}."""
    root = os.path.join(REPO_DIR, "cerbero_ray")
    out: dict[str, set[str]] = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, root).split(os.sep)
            if rel == ["__init__.py"]:
                continue
            part = rel[0][:-3] if len(rel) == 1 else rel[0]
            seen = out.setdefault(part, set())
            for node in ast.walk(ast.parse(open(path).read())):
                names = []
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "cerbero_ray":
                    mod = node.module.split(".")
                    names = [a.name for a in node.names] if len(mod) == 1 else [mod[1]]
                elif isinstance(node, ast.Import):
                    names = [a.name.split(".")[1] for a in node.names if a.name.startswith("cerbero_ray.")]
                seen.update(n for n in names if n != part)
    return out


def test_every_part_has_a_layer():
    assert set(imports()) == set(LAYER), "a new module or package: give it a layer here and in ARCHITECTURE.md"


def test_no_back_arrow_and_no_stage_imports_another():
    graph = imports()
    back = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if LAYER[b] > LAYER[a])
    assert not back, back
    across = sorted(f"{a} -> {b}" for a, bs in graph.items() for b in bs if a in STAGES and b in STAGES)
    assert not across, across
    assert {LAYER[b] for b in graph["config"]} <= {0}, graph["config"]  # config is a leaf above the ground floor
