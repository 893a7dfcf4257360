"""From a task's config to what a model runs: load the file (malformed rows are counted rejects),
sample the scored rows, pick the shots, and for every (protocol, prompt) of the task a *unit*: the
request of each scored row (chat messages to answer, or a text to score with a yes/no label task)
and how its answers are read. Pure Python.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field

from cerbero_ray import inputs
from cerbero_ray.config.evaluate import EvalTaskConfig
from cerbero_ray.evaluate import evalita, prompts, squad


def unit_key(protocol: str, prompt: int, draw: int = 0) -> str:
    """``generate/0`` (the first shot draw, or the only one), ``generate/0#2`` (the third)."""
    return f"{protocol}/{prompt}" + (f"#{draw}" if draw else "")


@dataclass
class Unit:
    """One (protocol, prompt wording, shot draw) of a task: a request per scored row."""

    protocol: str
    prompt: int
    requests: list[dict]  # {id, messages} (generate, benchita), {id, text} (score), + {task} per-row shots
    max_new_tokens: int = 0
    stop_at_newline: bool = True
    task: dict | None = None  # score: the yes/no label task (its shots and template)
    draw: int = 0  # which draw of few-shot examples (EVALITA generate/choice/score)
    choices: list[str] | None = None  # choice: the only answers the constrained decoding allows

    @property
    def key(self) -> str:
        return unit_key(self.protocol, self.prompt, self.draw)

    def prompt_hash(self) -> str:
        """Identifies exactly what the model is asked (every row's messages or text, the task)."""
        what = {"requests": self.requests, "task": self.task} | ({"choices": self.choices} if self.choices else {})
        blob = json.dumps(what, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Prepared:
    name: str
    kind: str
    rows: list[dict]  # scored rows: {id, gold (answers list or 0/1), ...}
    rejects: list[dict]
    units: list[Unit] = field(default_factory=list)
    shots: list[list[str]] = field(default_factory=list)  # each draw's shot ids (EVALITA generate/score)
    pool_rows: int = 0
    file_sha256: str = ""

    def identity(self, tc: EvalTaskConfig, seed: int, model: dict) -> str:
        """Fixes a (checkpoint, task)'s results: the task's config, the seed, the input file's contents,
        every unit's prompts, and how the model runs (``model``: checkpoint, dtype, prompt limit)."""
        blob = json.dumps(
            {
                "cfg": asdict(tc),
                "seed": seed,
                "file": self.file_sha256,
                "units": {u.key: u.prompt_hash() for u in self.units},
                "model": model,
            },
            sort_keys=True,
            ensure_ascii=False,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def wordings(tc: EvalTaskConfig, kind: str) -> list[int]:
    """The prompt wordings a task runs (``prompts``: their indices; null: every shipped one)."""
    shipped = len(prompts.PROMPTS["squad" if kind == "squad" else kind])
    return list(range(shipped)) if tc.prompts is None else list(tc.prompts)


def prepare(name: str, tc: EvalTaskConfig, seed: int) -> Prepared:
    """The rows of task ``name`` (config ``tc``) to score, and the units its protocols run."""
    if tc.kind == "squad":
        return _squad(name, tc, seed)
    return _evalita(name, tc, seed)


def _squad(name: str, tc: EvalTaskConfig, seed: int) -> Prepared:
    raw = inputs.read_bytes(tc.path)  # read once: its rows and its identity
    rows, rejects = squad.load(tc.path, raw)
    scored = squad.sample_rows(rows, tc.max_rows, seed)
    shots = {r["id"]: squad.shots_for(r, rows, tc.shots, seed) for r in scored}
    units = []
    for protocol in tc.protocols:
        if protocol == "generate":
            for p in wordings(tc, "squad"):
                reqs = [{"id": r["id"], "messages": prompts.squad_messages(p, r, shots[r["id"]])} for r in scored]
                units.append(Unit("generate", p, reqs, tc.max_new_tokens, True))
        elif protocol == "benchita":
            reqs = [{"id": r["id"], "messages": prompts.benchita_squad_messages(r, shots[r["id"]])} for r in scored]
            units.append(Unit("benchita", 0, reqs, prompts.BENCHITA_MAX_NEW_TOKENS["squad"], False))
    out = [{"id": r["id"], "gold": r["answers"], "context": r["context"], "question": r["question"]} for r in scored]
    return Prepared(name, "squad", out, rejects, units, pool_rows=len(rows), file_sha256=inputs.digest(raw))


def _evalita(name: str, tc: EvalTaskConfig, seed: int) -> Prepared:
    spec = evalita.SPECS[tc.kind]
    raw = inputs.read_bytes(tc.path)
    rows, rejects = evalita.load(spec, tc.path, raw)
    pool, scored = evalita.split(spec, rows, tc.pool_rows, seed)
    scored = squad.sample_rows(scored, tc.max_rows, seed)
    per_row = tc.shot_mode == "per_row" and tc.shots > 0
    # draw 0 keeps the seed's own set (the shots of every earlier run); 0-shot has nothing to draw
    draws = 1 if per_row or tc.shots == 0 else tc.shot_draws
    shot_sets = [evalita.pick_shots(pool, tc.shots, seed if d == 0 else f"{seed}:draw{d}") for d in range(draws)]
    own = {r["id"]: evalita.pick_shots(pool, tc.shots, f"{seed}:{r['id']}:shots") for r in scored} if per_row else {}
    units = []
    for protocol in tc.protocols:
        if protocol in ("generate", "choice", "score"):
            for d, shots in enumerate(shot_sets):
                for p in wordings(tc, tc.kind):
                    units.append(_evalita_unit(spec, protocol, p, d, shots, scored, own, tc.max_new_tokens))
        elif protocol == "benchita":
            reqs = []
            for r in scored:  # its own shots per row, from the held-out pool
                shots = random.Random(f"{seed}:{r['id']}:benchita").sample(pool, min(tc.shots, len(pool)))
                reqs.append({"id": r["id"], "messages": prompts.benchita_evalita_messages(tc.kind, r, shots)})
            units.append(Unit("benchita", 0, reqs, prompts.BENCHITA_MAX_NEW_TOKENS["evalita"], False))
    out = [{"id": r["id"], "gold": r["gold"], "text": r["text"]} for r in scored]
    ids = [] if per_row else [[s["id"] for s in shots] for shots in shot_sets]
    return Prepared(name, tc.kind, out, rejects, units, ids, len(pool), inputs.digest(raw))


def _evalita_unit(spec, protocol, p, d, shots, scored, own, max_new_tokens) -> Unit:
    """A generate, choice or score unit of wording ``p`` and draw ``d``: one shot set for every row, or
    (``own``: row id -> its shots) every row its own, carried by its request."""
    from cerbero_ray.inference.label_prompts import messages

    shared = None if own else evalita.build_task(spec, shots, p)  # one task for every row: built once
    reqs = []
    for r in scored:
        task = shared or evalita.build_task(spec, own[r["id"]], p)
        req = (
            {"id": r["id"], "text": r["text"]}
            if protocol == "score"
            else {"id": r["id"], "messages": messages(task, r["text"])}
        )
        if own and protocol == "score":
            req["task"] = task.keys()
        reqs.append(req)
    if protocol == "score":
        return Unit("score", p, reqs, task=None if own else shared.keys(), draw=d)
    if protocol == "choice":
        return Unit("choice", p, reqs, max_new_tokens, True, draw=d, choices=[prompts.YES, prompts.NO])
    return Unit("generate", p, reqs, max_new_tokens, True, draw=d)
