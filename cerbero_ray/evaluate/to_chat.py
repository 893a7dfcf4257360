"""A task's training rows as chat conversations in the task's own prompt format: a JSONL file in
the ``openai`` format that the data stage reads, to fine-tune on a task and evaluate on its test
rows. Pure Python.

    python -m cerbero_ray.evaluate.to_chat sentipolc ../shared/data/evalita/sentipolc.csv \\
        outputs/sentipolc_train.jsonl --split train
"""

from __future__ import annotations

import argparse
import json
import random

from cerbero_ray.evaluate import evalita
from cerbero_ray.inference.label_prompts import messages


def rows_to_chat(kind: str, path: str, split: str | None = "train", shots: int = 0, seed: int = 0) -> list[dict]:
    """One conversation per row of ``split`` (SENTIPOLC's column; ``None``: every row): the seed's
    question about the row's text, answered ``si``/``no`` by its gold label, after ``shots``
    examples drawn from the same rows (seeded, never the row itself)."""
    spec = evalita.SPECS[kind]
    rows, _ = evalita.load(spec, path)
    rows = [r for r in rows if split is None or r["split"] == split]
    if not rows:
        raise ValueError(f"{path}: no {kind} rows{f' in split {split!r}' if split else ''}")
    rng, out = random.Random(seed), []
    for r in rows:
        pool = [x for x in rng.sample(rows, min(len(rows), shots + 1)) if x["id"] != r["id"]][:shots]
        task = evalita.build_task(spec, pool)
        msgs = messages(task, r["text"]) + [{"role": "assistant", "content": evalita.YES if r["gold"] else evalita.NO}]
        out.append({"id": r["id"], "messages": msgs})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=sorted(evalita.SPECS))
    p.add_argument("path")
    p.add_argument("out")
    p.add_argument("--split", default="train", help="SENTIPOLC's train/test column; 'all' for every row")
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    convs = rows_to_chat(a.kind, a.path, None if a.split == "all" else a.split, a.shots, a.seed)
    with open(a.out, "w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    print(f"{len(convs)} conversations -> {a.out}")


if __name__ == "__main__":
    main()
