"""Evaluation metrics. Pure Python (+ scikit-learn for classification).

SQuAD: exact match and F1 exactly as the official SQuAD v1.1 evaluation script defines them
(lower case, ASCII punctuation removed, the English articles ``a an the`` removed, whitespace
collapsed; F1 over the bag of tokens; the maximum over the gold answers), and an Italian-normalised
variant in its own column: the same, but Italian articles (``il lo la i gli le un uno una``) and the
elided forms before an apostrophe (``l' un' dell' all' dall' nell' sull'`` …) are removed; accents
are kept. The official script removes punctuation first, so ``l'ottobre`` becomes ``lottobre`` and
matches neither ``ottobre`` nor ``l'ottobre`` written with a typographic apostrophe; the Italian
variant splits at the apostrophe first.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

_PUNCT = set(string.punctuation)
_IT_ARTICLES = {"il", "lo", "la", "i", "gli", "le", "un", "uno", "una"}
_IT_ELIDED = re.compile(r"\b(?:l|un|dell|all|dall|nell|sull|coll|pell)['’]", flags=re.IGNORECASE)


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def normalize_answer_it(s: str) -> str:
    """Italian articles and elided forms removed (before punctuation, which would glue them on)."""
    s = _IT_ELIDED.sub(" ", s.lower())
    s = "".join(ch if ch not in _PUNCT and ch != "’" else " " for ch in s)
    return " ".join(w for w in s.split() if w not in _IT_ARTICLES)


def exact_match(prediction: str, gold: str, normalize=normalize_answer) -> float:
    return float(normalize(prediction) == normalize(gold))


def f1(prediction: str, gold: str, normalize=normalize_answer) -> float:
    pred, ref = normalize(prediction).split(), normalize(gold).split()
    common = Counter(pred) & Counter(ref)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)


def best(metric, prediction: str, golds: list[str], normalize=normalize_answer) -> float:
    """The maximum over the gold answers, as the official script takes it."""
    return max(metric(prediction, g, normalize) for g in golds)


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict:
    """EM and F1 (×100) over the questions in ``golds``, official and Italian-normalised; a
    question without a prediction counts as wrong (as in the official script)."""
    n = len(golds)
    out = {"rows": n}
    for suffix, norm in (("", normalize_answer), ("_it", normalize_answer_it)):
        em = sum(best(exact_match, predictions.get(q, ""), g, norm) for q, g in golds.items())
        f = sum(best(f1, predictions.get(q, ""), g, norm) for q, g in golds.items())
        out[f"em{suffix}"] = 100.0 * em / n if n else 0.0
        out[f"f1{suffix}"] = 100.0 * f / n if n else 0.0
    return out


def _fold(s: str) -> str:
    s = unicodedata.normalize("NFKD", s.lower())
    s = "".join(ch for ch in s if not unicodedata.combining(ch))
    return " ".join("".join(ch if ch.isalnum() else " " for ch in s).split())


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def nearest_label(answer: str, verbalizers: dict[str, str]) -> str:
    """The label whose verbalizer is nearest to ``answer`` by edit distance, after lower-casing and
    removing accents and punctuation (``Sì.`` → ``si``); a tie goes to the first label listed."""
    a = _fold(answer)
    return min(verbalizers, key=lambda k: edit_distance(a, _fold(verbalizers[k])))


def classification_scores(gold: list[int], pred: list[int]) -> dict:
    """F1 of the positive class (1), macro-F1 and accuracy (scikit-learn), ×100."""
    from sklearn.metrics import accuracy_score, f1_score

    if not gold:
        return {"rows": 0, "f1": 0.0, "macro_f1": 0.0, "accuracy": 0.0}
    return {
        "rows": len(gold),
        "f1": 100.0 * f1_score(gold, pred, pos_label=1, zero_division=0),
        "macro_f1": 100.0 * f1_score(gold, pred, average="macro", labels=[0, 1], zero_division=0),
        "accuracy": 100.0 * accuracy_score(gold, pred),
    }


def baselines(gold: list[int]) -> dict:
    """What chance gives on the same rows: the majority class of these rows, and always positive."""
    majority = int(sum(gold) * 2 > len(gold))
    return {
        "majority_class": {**classification_scores(gold, [majority] * len(gold)), "predicts": majority},
        "always_positive": classification_scores(gold, [1] * len(gold)),
    }
