"""SQuAD-it: loader, shots, answer clean-up, the official script's files. Pure Python.

Our ``generate`` protocol (:mod:`cerbero_ray.evaluate.prompts`): 3-shot, each shot a chat turn in
the cerbero template (user ``Dato il seguente testo:\\n{context}\\nRispondi brevemente a questa
domanda:\\n{question}``, assistant ``Risposta breve: {answer}``; or a second wording), then the
scored question; greedy decoding, at most 32 new tokens; the answer is cut at the first newline or
``[|Umano|]`` and the ``Risposta breve:`` prefix removed. Shots are drawn with a fixed seed per
question from the questions of *other* articles, so no shot shares the scored question's context.
Gold answers are kept as the official script reads them, an empty one included.
"""

from __future__ import annotations

import json
import random

from cerbero_ray import inputs
from cerbero_ray.chat import STOP_STRING
from cerbero_ray.evaluate.prompts import ANSWER_PREFIX


def load(path: str, raw: bytes | None = None) -> tuple[list[dict], list[dict]]:
    """SQuAD v1.1 JSON → (rows ``{id, article, context, question, answers}``, rejects ``{id, reason}``).
    A question without a usable id, question or answer is a reject, never silently dropped. ``raw``:
    the file's contents when already read (:func:`cerbero_ray.inputs.read_bytes`)."""
    doc = json.loads(inputs.read_bytes(path) if raw is None else raw)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise ValueError(f"{path}: not SQuAD v1.1 JSON (no top-level 'data' list)")
    rows, rejects, seen = [], [], set()
    for a, article in enumerate(doc["data"]):
        for para in article.get("paragraphs", []) if isinstance(article, dict) else []:
            context = para.get("context") if isinstance(para, dict) else None
            for qa in para.get("qas", []) if isinstance(context, str) and context.strip() else []:
                qid = str(qa.get("id")) if isinstance(qa, dict) and qa.get("id") is not None else None
                # every gold answer as the official script reads it, an empty one included (it
                # matches an empty prediction there); no answer at all is a reject
                answers = [x.get("text") for x in qa.get("answers", []) if isinstance(x, dict)] if qid else []
                answers = [x for x in answers if isinstance(x, str)]
                reason = (
                    "no_id"
                    if qid is None
                    else "duplicate_id"
                    if qid in seen
                    else "no_question"
                    if not isinstance(qa.get("question"), str) or not qa["question"].strip()
                    else "no_answer"
                    if not answers
                    else None
                )
                if reason:
                    rejects.append({"id": qid, "reason": reason})
                    continue
                seen.add(qid)
                rows.append(
                    {"id": qid, "article": a, "context": context, "question": qa["question"], "answers": answers}
                )
    return rows, rejects


def sample_rows(rows: list[dict], max_rows: int | None, seed: int) -> list[dict]:
    """All rows, or a seeded sample of ``max_rows`` of them in their original order."""
    if max_rows is None or max_rows >= len(rows):
        return rows
    keep = set(random.Random(seed).sample(range(len(rows)), max_rows))
    return [r for i, r in enumerate(rows) if i in keep]


def shots_for(row: dict, pool: list[dict], k: int, seed: int) -> list[dict]:
    """``k`` shots from ``pool`` outside ``row``'s article, seeded by the question id."""
    others = [r for r in pool if r["article"] != row["article"]]
    if len(others) < k:
        raise ValueError(
            f"squad: {k} shots need {k} questions outside article {row['article']}; the file has "
            f"{len(others)} (use a file with more articles, or fewer shots)"
        )
    return random.Random(f"{seed}:{row['id']}").sample(others, k)


def clean_answer(text: str) -> str:
    """The generated text cut at the first newline or the stop string, the prefix removed (the
    engines stop at both, so this only matters for text from elsewhere)."""
    text = text.split(STOP_STRING, 1)[0].split("\n", 1)[0].strip()
    if text.lower().startswith(ANSWER_PREFIX.lower()):
        text = text[len(ANSWER_PREFIX) :].strip()
    return text


def subset(rows: list[dict]) -> dict:
    """The scored questions as a SQuAD v1.1 dataset (``gold.json``): with ``predictions.json``, the
    official evaluation script's two inputs (``evaluate-v1.1.py gold.json predictions.json``)."""
    paras = [
        {
            "context": r["context"],
            "qas": [{"id": r["id"], "question": r["question"], "answers": [{"text": a} for a in r["gold"]]}],
        }
        for r in rows
    ]
    return {"version": "1.1", "data": [{"title": "scored questions", "paragraphs": paras}]}


def rescore(dataset: dict, predictions: dict[str, str]) -> dict:
    """EM and F1 of ``predictions`` over every question of a SQuAD v1.1 ``dataset``, as the official
    script computes them (a question without a prediction scores 0)."""
    from cerbero_ray.evaluate.metrics import squad_scores

    golds = {
        qa["id"]: [a["text"] for a in qa["answers"]]
        for art in dataset["data"]
        for para in art["paragraphs"]
        for qa in para["qas"]
    }
    s = squad_scores(predictions, golds)
    return {"exact_match": s["em"], "f1": s["f1"]}


if __name__ == "__main__":  # python -m cerbero_ray.evaluate.squad gold.json predictions.json
    import sys

    with open(sys.argv[1], encoding="utf-8") as f, open(sys.argv[2], encoding="utf-8") as g:
        print(json.dumps(rescore(json.load(f), json.load(g))))
