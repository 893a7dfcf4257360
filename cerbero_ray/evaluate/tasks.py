"""From a task's config to the rows a model actor runs: load the file, sample, pick the shots, and
describe each scored row (its chat messages, or its text for the scorer). Pure Python."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from cerbero_ray.evaluate import evalita, squad
from cerbero_ray.inference.label_prompts import messages


@dataclass
class Prepared:
    name: str
    kind: str
    rows: list[dict]  # scored rows: {id, gold (answers list or 0/1), messages?, text?}
    rejects: list[dict]
    task: dict | None = None  # the scorer's Task (EVALITA)
    shots: list[str] = field(default_factory=list)  # the shots' ids
    pool_rows: int = 0

    def identity(self, tc: dict, seed: int) -> str:
        """Fixes a task's results: config, seed, the scored ids and the prompts' inputs."""
        blob = json.dumps(
            {"cfg": tc, "seed": seed, "ids": [r["id"] for r in self.rows], "shots": self.shots, "task": self.task},
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare(name: str, tc: dict, seed: int) -> Prepared:
    """The rows of task ``name`` (config ``tc``) to score, with their prompts' inputs."""
    if tc["kind"] == "squad":
        rows, rejects = squad.load(tc["path"])
        scored = squad.sample_rows(rows, tc.get("max_rows"), seed)
        out = []
        for r in scored:
            shots = squad.shots_for(r, rows, tc["shots"], seed)
            out.append(
                {
                    "id": r["id"],
                    "gold": r["answers"],
                    "messages": squad.messages(r, shots),
                    "context": r["context"],
                    "question": r["question"],
                }
            )
        return Prepared(name, "squad", out, rejects, pool_rows=len(rows))
    spec = evalita.SPECS[tc["kind"]]
    rows, rejects = evalita.load(spec, tc["path"])
    pool, scored = evalita.split(spec, rows, tc["pool_rows"], seed)
    scored = squad.sample_rows(scored, tc.get("max_rows"), seed)
    shots = evalita.pick_shots(pool, tc["shots"], seed)
    task = evalita.build_task(spec, shots)
    out = [{"id": r["id"], "gold": r["gold"], "text": r["text"], "messages": messages(task, r["text"])} for r in scored]
    return Prepared(name, tc["kind"], out, rejects, asdict(task), [s["id"] for s in shots], len(pool))
