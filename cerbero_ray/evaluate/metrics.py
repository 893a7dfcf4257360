"""Evaluation metrics. Pure Python and NumPy (+ scikit-learn, which the tests check them against).

SQuAD v1.1: exact match and F1 exactly as the official evaluation script defines them (lower case,
ASCII punctuation removed, the English articles ``a an the`` removed, whitespace collapsed; F1 over
the bag of tokens; the maximum over the gold answers, empty ones included; a question without a
prediction scores 0). The Italian-normalised variant (:func:`normalize_answer_it`, its own column)
is defined in the README with examples. SQuAD v2 (the benchita protocol): the same normalisation,
an empty answer matches only an empty answer, against one gold answer.

EVALITA: F1 of the positive class, macro-F1 and accuracy (scikit-learn's definitions), and for the
benchita protocol the macro and weighted F1 of scikit-learn's ``classification_report`` over the
classes present (an unknown answer is a class of its own).

Intervals: a percentile bootstrap over rows (:func:`bootstrap`), and a paired one for the
difference of two models on the same rows (:func:`paired_bootstrap`).
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter

import numpy as np

_PUNCT = set(string.punctuation)

# ── SQuAD ────────────────────────────────────────────────────────────────────────────────────────


def normalize_answer(s: str) -> str:
    """The official SQuAD v1.1 normalisation."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


# articles and articulated prepositions (preposition + article), in full and elided before a vowel;
# simple prepositions (di, a, da, in, su, con, per) are content and stay
IT_ARTICLES = {"il", "lo", "la", "i", "gli", "le", "un", "uno", "una"}
IT_ARTICULATED = {
    p + a
    for p in ("de", "a", "da", "ne", "su")
    for a in ("l", "llo", "lla", "i", "gli", "lle")  # del dello della dei degli delle, al allo alla…
} | {"col", "coi"}
_IT_ELIDED = re.compile(r"\b(l|un|dell|all|dall|nell|sull|coll|pell)['’](?=\w)", flags=re.IGNORECASE)


def _punctuation(ch: str) -> bool:
    return ch in _PUNCT or unicodedata.category(ch).startswith("P")


def normalize_answer_it(s: str) -> str:
    """The Italian-normalised variant: Unicode composed (NFC), an elided article or articulated
    preposition before a vowel dropped (``l'anno``, ``dell’arte``), the full forms dropped too
    (``il``, ``della``, ``negli``…), punctuation (ASCII and Unicode: « » “ ” – …) deleted as the
    official script deletes it (``1.000`` = ``1000``, ``U.S.A.`` = ``USA``), lower case; ``i`` is an
    article only written in lower case (``Carlo I`` keeps its numeral). Accents are kept."""
    s = unicodedata.normalize("NFC", s)
    s = _IT_ELIDED.sub(" ", s)
    words = []
    for raw in s.split():
        w = "".join(ch for ch in raw if not _punctuation(ch))
        low = w.lower()
        if not low or low in IT_ARTICULATED or (low in IT_ARTICLES and (low != "i" or w == "i")):
            continue
        words.append(low)
    return " ".join(words)


def exact_match(prediction: str, gold: str, normalize=normalize_answer) -> float:
    return float(normalize(prediction) == normalize(gold))


def f1(prediction: str, gold: str, normalize=normalize_answer) -> float:
    """Official v1.1: token-bag F1 (0 when nothing is shared, including an empty side)."""
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


def squad_rows(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict[str, np.ndarray]:
    """Per question (in ``golds``' order): EM and F1 (0/1 and [0, 1]), official and Italian. A
    question without a prediction scores 0, even against an empty gold answer."""
    out = {k: np.zeros(len(golds)) for k in ("em", "f1", "em_it", "f1_it")}
    for i, (q, g) in enumerate(golds.items()):
        if q not in predictions:
            continue
        for suffix, norm in (("", normalize_answer), ("_it", normalize_answer_it)):
            out[f"em{suffix}"][i] = best(exact_match, predictions[q], g, norm)
            out[f"f1{suffix}"][i] = best(f1, predictions[q], g, norm)
    return out


def squad_scores(predictions: dict[str, str], golds: dict[str, list[str]]) -> dict:
    """EM and F1 (×100) over the questions in ``golds``, official and Italian-normalised."""
    per_row = squad_rows(predictions, golds)
    return {"rows": len(golds), **{k: 100.0 * float(v.mean()) if len(v) else 0.0 for k, v in per_row.items()}}


def v2_rows(predictions: dict[str, str], first_golds: dict[str, str]) -> dict[str, np.ndarray]:
    """SQuAD v2's exact and F1 per question against one gold answer: an empty answer (or an
    empty gold) matches only an empty one."""
    em, f = np.zeros(len(first_golds)), np.zeros(len(first_golds))
    for i, (q, gold) in enumerate(first_golds.items()):
        if q not in predictions:
            continue
        g, p = normalize_answer(gold).split(), normalize_answer(predictions[q]).split()
        em[i] = float(g == p)
        if not g or not p:
            f[i] = float(g == p)
        else:
            same = sum((Counter(g) & Counter(p)).values())
            f[i] = 0.0 if same == 0 else 2 * (same / len(p)) * (same / len(g)) / (same / len(p) + same / len(g))
    return {"exact": em, "f1": f}


# ── answers to labels ───────────────────────────────────────────────────────────────────────────


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


def first_word_label(answer: str, verbalizers: dict[str, str]) -> str | None:
    """The label whose verbalizer is the answer's first word (case, accents and punctuation folded:
    ``Sì, è misogino`` → ``si``), or None: the answer is *unparsed*."""
    words = _fold(answer).split()
    if not words:
        return None
    return next((k for k, v in verbalizers.items() if _fold(v) == words[0]), None)


def parse_yes_no(answer: str, verbalizers: dict[str, str]) -> tuple[str, bool]:
    """(label, parsed): the first word's label; an unparsed answer falls back to the nearest label by
    edit distance (``parsed`` False, counted as such)."""
    label = first_word_label(answer, verbalizers)
    return (label, True) if label is not None else (nearest_label(answer, verbalizers), False)


def prefix_class(answer: str, classes: list[str], unknown: str) -> str:
    """benchita's mapping: the class the answer (stripped) is, or starts with, or is a start of,
    trying the longest class first; else ``unknown``. (An empty answer is a start of every class,
    so it maps to the longest: benchita's own behaviour, kept.)"""
    s = answer.strip()
    if s in classes:
        return s
    for c in sorted(classes, key=len, reverse=True):
        if s.startswith(c) or c.startswith(s):
            return c
    return unknown


# ── classification ──────────────────────────────────────────────────────────────────────────────


def _binary(gold: np.ndarray, pred: np.ndarray) -> dict[str, np.ndarray]:
    """F1 of class 1, macro-F1 over {0, 1}, accuracy (×100) for each row of ``gold``/``pred``
    (2-D: resamples × rows)."""
    tp = ((gold == 1) & (pred == 1)).sum(-1)
    fp = ((gold == 0) & (pred == 1)).sum(-1)
    fn = ((gold == 1) & (pred == 0)).sum(-1)
    tn = ((gold == 0) & (pred == 0)).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        f_pos = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 0.0)
        f_neg = np.where(2 * tn + fn + fp > 0, 2 * tn / (2 * tn + fn + fp), 0.0)
    n = gold.shape[-1]
    return {"f1": 100 * f_pos, "macro_f1": 100 * (f_pos + f_neg) / 2, "accuracy": 100 * (tp + tn) / max(n, 1)}


def _report(gold: np.ndarray, pred: np.ndarray, classes: int) -> dict[str, np.ndarray]:
    """``classification_report``'s macro and weighted F1 (×100) over the classes present in gold or
    prediction, for each row (2-D: resamples × rows); ``pred`` may hold class ``classes - 1``
    (unknown), never in gold."""
    f1s, present, support = [], [], []
    for c in range(classes):
        tp = ((gold == c) & (pred == c)).sum(-1)
        p, t = (pred == c).sum(-1), (gold == c).sum(-1)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1s.append(np.where(p + t > 0, 2 * tp / (p + t), 0.0))
        present.append((p + t) > 0)
        support.append(t)
    f, pr, sup = np.stack(f1s), np.stack(present), np.stack(support)
    macro = (f * pr).sum(0) / np.maximum(pr.sum(0), 1)
    weighted = (f * sup).sum(0) / np.maximum(sup.sum(0), 1)
    return {"macro_f1": 100 * macro, "weighted_f1": 100 * weighted}


def classification_scores(gold: list[int], pred: list[int]) -> dict:
    """F1 of the positive class (1), macro-F1 and accuracy, ×100."""
    if not gold:
        return {"rows": 0, "f1": 0.0, "macro_f1": 0.0, "accuracy": 0.0}
    s = _binary(np.asarray(gold)[None], np.asarray(pred)[None])
    return {"rows": len(gold), **{k: float(v[0]) for k, v in s.items()}}


def report_scores(gold: list[int], pred: list[int]) -> dict:
    """benchita's figures: macro and weighted F1 of ``classification_report`` (labels 0, 1; an
    unknown answer is 2), and accuracy; ×100."""
    if not gold:
        return {"rows": 0, "macro_f1": 0.0, "weighted_f1": 0.0, "accuracy": 0.0}
    g, p = np.asarray(gold)[None], np.asarray(pred)[None]
    s = _report(g, p, 3)
    return {
        "rows": len(gold),
        **{k: float(v[0]) for k, v in s.items()},
        "accuracy": 100.0 * float((g == p).mean()),
    }


def baselines(gold: list[int]) -> dict:
    """What chance gives on the same rows: the majority class of these rows, and always positive."""
    majority = int(sum(gold) * 2 > len(gold))
    return {
        "majority_class": {**classification_scores(gold, [majority] * len(gold)), "predicts": majority},
        "always_positive": classification_scores(gold, [1] * len(gold)),
    }


# ── intervals ───────────────────────────────────────────────────────────────────────────────────


def resamples(n: int, count: int, seed: int) -> np.ndarray:
    """``count`` bootstrap resamples of ``n`` rows (row indices, drawn with replacement, seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(count, n))


def metric_fn(kind: str):
    """For a task kind, the function from (per-row arrays indexed by a resample matrix) to each
    metric over the resamples: ``f(columns, idx) -> {metric: array of len(idx)}``."""
    if kind == "squad":
        return lambda cols, idx: {k: 100 * cols[k][idx].mean(-1) for k in cols}
    if kind == "report":
        return lambda cols, idx: {
            **_report(cols["gold"][idx], cols["pred"][idx], 3),
            "accuracy": 100 * (cols["gold"][idx] == cols["pred"][idx]).mean(-1),
        }
    return lambda cols, idx: _binary(cols["gold"][idx], cols["pred"][idx])


def bootstrap(kind: str, cols: dict[str, np.ndarray], count: int = 1000, seed: int = 0) -> dict[str, list[float]]:
    """The 95% percentile interval of each metric over ``count`` resamples of the rows."""
    n = len(next(iter(cols.values())))
    if n == 0 or count == 0:
        return {}
    values = metric_fn(kind)(cols, resamples(n, count, seed))
    return {k: [round(float(q), 4) for q in np.percentile(v, [2.5, 97.5])] for k, v in values.items()}


def paired_bootstrap(
    kind: str, a: dict[str, np.ndarray], b: dict[str, np.ndarray], count: int = 1000, seed: int = 0
) -> dict[str, dict]:
    """``b − a`` for each metric, on the same rows and the same resamples: the difference, its 95%
    interval, and the share of resamples where it is not above 0."""
    n = len(next(iter(a.values())))
    if n == 0 or count == 0:
        return {}
    idx, fn = resamples(n, count, seed), metric_fn(kind)
    whole = np.arange(n)[None]
    va, vb, pa, pb = fn(a, idx), fn(b, idx), fn(a, whole), fn(b, whole)
    out = {}
    for k in va:
        d = vb[k] - va[k]
        out[k] = {
            "diff": round(float(pb[k][0] - pa[k][0]), 4),
            "ci": [round(float(np.percentile(d, 2.5)), 4), round(float(np.percentile(d, 97.5)), 4)],
            "p_not_better": round(float((d <= 0).mean()), 4),
        }
    return out


def prompt_summary(values: list[float]) -> dict:
    """Over the prompts of a task: mean, standard deviation, best (and which), and the combined
    score the Evalita-LLM leaderboard reports, ``(1 - (best - mean) / 100) * best``."""
    v = np.asarray(values, dtype=float)
    best_i = int(v.argmax())
    mean, top = float(v.mean()), float(v[best_i])
    return {
        "mean": round(mean, 4),
        "std": round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4),
        "best": round(top, 4),
        "best_prompt": best_i,
        "combined": round((1 - (top - mean) / 100) * top, 4),
        "prompts": len(v),
    }
