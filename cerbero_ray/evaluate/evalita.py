"""EVALITA tasks, as the seed's table names them: AMI 2020 (toxicity = ``misogynous``), IronITA
2018 (irony = ``irony``), SENTIPOLC 2014 (sentiment = ``negativo``, the binary reading). Pure Python.

Each is a few-shot yes/no question in Italian (:data:`cerbero_ray.evaluate.prompts.PROMPTS`: several
wordings). The shots come from a pool disjoint from the scored rows: SENTIPOLC's own ``train`` rows
(its ``test`` rows are scored); for the others a fixed-seed pool of ``pool_rows`` rows is held out
and the rest is scored. Under ``generate``/``score`` the shots are the same for every scored row
(drawn with the seed, both answers represented), which lets the scorer run the shared prefix once.
A row whose id repeats an earlier row's is a counted reject (``duplicate_id``): every figure of a
table is computed on the same rows.
"""

from __future__ import annotations

import csv
import io
import random
from dataclasses import dataclass

from cerbero_ray import inputs
from cerbero_ray.config.label_task import LabelTask
from cerbero_ray.evaluate.prompts import NO, PROMPTS, YES  # noqa: F401 (YES/NO: the answers, re-exported)


@dataclass(frozen=True)
class Spec:
    name: str
    question: str  # what the user is asked about the text
    delimiter: str
    text_col: str
    gold_col: str
    split_col: str | None = None  # SENTIPOLC: train / test


SPECS = {
    "ami2020": Spec("ami2020", "Il suo contenuto è misogino?", "\t", "text", "misogynous"),
    "ironita": Spec("ironita", "Il suo contenuto è ironico?", ";", "text", "irony"),
    "sentipolc": Spec("sentipolc", "Il suo contenuto è negativo?", ";", "tweet", "negativo", "set"),
}
SEED_NAMES = {"ami2020": "toxicity", "ironita": "irony", "sentipolc": "sentiment"}  # the seed's table headers
_TRUE, _FALSE = {"1", "true", "yes"}, {"0", "false", "no"}


def template(spec: Spec, prompt: int = 0) -> str:
    return PROMPTS[spec.name][prompt]


def _gold(value) -> int | None:
    v = str(value).strip().lower() if value is not None else ""
    return 1 if v in _TRUE else 0 if v in _FALSE else None


def load(spec: Spec, path: str, raw: bytes | None = None) -> tuple[list[dict], list[dict]]:
    """Rows ``{id, text, gold, split}`` and rejects ``{id, line, reason}`` (a row with no text, an
    unknown gold value or the wrong number of fields is counted, never silently dropped). ``raw``:
    the file's contents when already read (:func:`cerbero_ray.inputs.read_bytes`)."""
    text = (inputs.read_bytes(path) if raw is None else raw).decode("utf-8", errors="replace")
    reader = csv.DictReader(io.StringIO(text), delimiter=spec.delimiter)
    missing = {spec.text_col, spec.gold_col, *([spec.split_col] if spec.split_col else [])} - set(
        reader.fieldnames or []
    )
    if missing:
        raise ValueError(f"{path}: not a {spec.name} file (no column {sorted(missing)}; has {reader.fieldnames})")
    rows, rejects, seen = [], [], set()
    for line, rec in enumerate(reader, start=2):
        rid = (rec.get("id") or "").strip() or f"line{line}"
        text, gold = rec.get(spec.text_col), _gold(rec.get(spec.gold_col))
        reason = (
            "wrong_field_count"
            if None in rec or any(v is None for v in rec.values())
            else "no_text"
            if not text or not text.strip()
            else "bad_gold"
            if gold is None
            else "duplicate_id"
            if rid in seen
            else None
        )
        if reason:
            rejects.append({"id": rid, "line": line, "reason": reason})
            continue
        seen.add(rid)
        split = (rec.get(spec.split_col) or "").strip().lower() if spec.split_col else None
        rows.append({"id": rid, "text": text.strip(), "gold": gold, "split": split})
    return rows, rejects


def split(spec: Spec, rows: list[dict], pool_rows: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(shot pool, scored rows), disjoint."""
    if spec.split_col:
        pool = [r for r in rows if r["split"] == "train"]
        scored = [r for r in rows if r["split"] == "test"]
        if not pool or not scored:
            raise ValueError(f"{spec.name}: needs both 'train' and 'test' rows in column {spec.split_col!r}")
        return pool, scored
    if len(rows) <= pool_rows:
        raise ValueError(f"{spec.name}: {len(rows)} rows cannot hold out a shot pool of {pool_rows}")
    held = set(random.Random(f"{seed}:{spec.name}:pool").sample(range(len(rows)), pool_rows))
    return [r for i, r in enumerate(rows) if i in held], [r for i, r in enumerate(rows) if i not in held]


def pick_shots(pool: list[dict], k: int, seed: int) -> list[dict]:
    """``k`` shots from the pool (seeded), at least one of each answer when ``k`` >= 2."""
    order = random.Random(seed).sample(pool, len(pool))
    shots = order[:k]
    if k >= 2 and len({s["gold"] for s in shots}) < 2:
        other = next((r for r in order[k:] if r["gold"] != shots[0]["gold"]), None)
        if other is not None:
            shots[-1] = other
    return shots


def build_task(spec: Spec, shots: list[dict], prompt: int = 0) -> LabelTask:
    """The scorer's task: ``si``/``no`` verbalizers, prompt ``prompt``'s question as the human's turn."""
    return LabelTask(
        name=spec.name,
        instruction=spec.question,
        labels={"no": NO, "yes": YES},  # "no" first: a tie in nearest-label mapping goes to it
        few_shot=[{"text": s["text"], "label": "yes" if s["gold"] else "no"} for s in shots],
        template=template(spec, prompt),
    )
