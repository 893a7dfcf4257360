"""From a unit's raw answers to predictions, per-row metric columns and the unit's figures (with
their bootstrap intervals). Pure Python and NumPy.

How each protocol reads an answer (:mod:`cerbero_ray.evaluate.prompts`):

- SQuAD ``generate``: the answer cut at the first newline, ``Risposta breve:`` removed; EM/F1
  official and Italian-normalised, per row.
- SQuAD ``benchita``: the answer as generated (cut at ``[|Umano|]``); SQuAD v2 exact/F1 against the
  first gold answer.
- EVALITA ``generate``: the first word's label (``si``/``no``); an answer whose first word is
  neither is *unparsed*, counted, and mapped to the nearest label by edit distance (the fallback).
- EVALITA ``choice``: read as ``generate``; the answer was generated under a choice constraint
  (exactly ``si`` or ``no``), so none is unparsed unless it was cut short.
- EVALITA ``score``: yes when p(yes) > 0.5.
- EVALITA ``benchita``: prefix matching to the upper-case labels, or the unknown class (counted).
"""

from __future__ import annotations

import json

import numpy as np

from cerbero_ray.chat import STOP_STRING
from cerbero_ray.evaluate import prompts, squad
from cerbero_ray.evaluate.metrics import (
    bootstrap,
    metric_fn,
    parse_yes_no,
    prefix_class,
    squad_rows,
    v2_rows,
)
from cerbero_ray.evaluate.tasks import Prepared, Unit

VERBALIZERS = {"no": prompts.NO, "yes": prompts.YES}


def metric_kind(kind: str, protocol: str) -> str:
    """How a unit's figures are computed from its per-row columns (:func:`metrics.metric_fn`)."""
    if kind == "squad":
        return "squad"
    return "report" if protocol == "benchita" else "binary"


def read_unit(p: Prepared, unit: Unit, outs: dict[str, dict]) -> tuple[list[dict], dict[str, np.ndarray], dict]:
    """(prediction rows for ``predictions.parquet``, per-row metric columns, counts) of one unit;
    ``outs``: id -> {raw, p_yes, truncated}."""
    rows, counts = [], {"unparsed": 0, "unknown": 0, "errors": 0, "truncated": 0}
    golds = {r["id"]: r["gold"] for r in p.rows}
    if p.kind == "squad":
        if unit.protocol == "generate":
            preds = {q: squad.clean_answer(outs[q]["raw"] or "") for q in golds}
            cols = squad_rows(preds, golds)
        else:
            preds = {q: (outs[q]["raw"] or "").split(STOP_STRING, 1)[0].strip() for q in golds}
            cols = v2_rows(preds, {q: (g[0] if g else "") for q, g in golds.items()})
        for i, q in enumerate(golds):
            rows.append(_row(q, unit, golds[q], preds[q], outs[q], None, None, {k: v[i] for k, v in cols.items()}))
    else:
        gold, pred = [], []
        labels = list(prompts.BENCHITA_LABELS.get(p.kind, ()))
        for q, g in golds.items():
            o, parsed = outs[q], None
            if unit.protocol in ("generate", "choice"):
                label, parsed = parse_yes_no(o["raw"] or "", VERBALIZERS)
                counts["unparsed"] += not parsed
                c = int(label == "yes")
            elif unit.protocol == "score":
                counts["errors"] += o["p_yes"] is None and not o.get("error")  # too long: counted, read as no
                c = int((o["p_yes"] or 0.0) > 0.5)
            else:
                cls = prefix_class(o["raw"] or "", labels, prompts.BENCHITA_UNKNOWN)
                c = labels.index(cls) if cls in labels else 2
                counts["unknown"] += c == 2
            gold.append(int(g))
            pred.append(c)
            rows.append(_row(q, unit, g, str(c), o, parsed, (int(g), c), {}))
        cols = {"gold": np.asarray(gold), "pred": np.asarray(pred)}
    counts["truncated"] = sum(bool(outs[q]["truncated"]) for q in golds)
    counts["errors"] += sum(bool(outs[q].get("error")) for q in golds)  # rows an endpoint refused (400)
    return rows, cols, counts


def _row(q, unit: Unit, gold, prediction, out: dict, parsed, classes, scores: dict) -> dict:
    return {
        "id": q,
        "protocol": unit.protocol,
        "prompt": unit.prompt,
        "draw": unit.draw,
        "gold": json.dumps(gold, ensure_ascii=False),
        "prediction": str(prediction),
        "raw": out.get("raw"),
        "p_yes": out.get("p_yes"),
        "parsed": parsed,
        "truncated": bool(out.get("truncated")),
        "gold_class": classes[0] if classes else None,
        "pred_class": classes[1] if classes else None,
        **{k: float(scores[k]) if k in scores else None for k in SCORE_COLUMNS},
    }


SCORE_COLUMNS = ("em", "f1", "em_it", "f1_it", "exact")


def columns_from_rows(kind: str, rows: list[dict]) -> dict[str, np.ndarray]:
    """A unit's per-row metric columns, from its rows of ``predictions.parquet`` (a rerun that
    reuses finished results still compares checkpoints row by row)."""
    if kind == "squad":
        keys = [k for k in SCORE_COLUMNS if rows and rows[0].get(k) is not None]
        return {k: np.asarray([r[k] for r in rows], dtype=float) for k in keys}
    return {"gold": np.asarray([r["gold_class"] for r in rows]), "pred": np.asarray([r["pred_class"] for r in rows])}


def figures(kind: str, cols: dict[str, np.ndarray], counts: dict, resamples: int, seed: int) -> dict:
    """The unit's figures on every row, their 95% intervals, and its counts."""
    n = len(next(iter(cols.values()))) if cols else 0
    values = metric_fn(kind)(cols, np.arange(n)[None]) if n else {}
    return {
        "rows": n,
        **{k: round(float(v[0]), 4) for k, v in values.items()},
        "ci": bootstrap(kind, cols, resamples, seed),
        **counts,
    }
