"""The evaluation stage's pure parts: SQuAD v1.1 metrics on hand-derived Italian cases, F1 equal
to scikit-learn's by hand, the nearest-label mapping, deterministic shots that never leak a scored
row, loaders that count malformed rows, and config errors that name the key."""

import json

import pytest

from cerbero_ray.config import compose
from cerbero_ray.evaluate import evalita, squad
from cerbero_ray.evaluate.metrics import (
    best,
    classification_scores,
    exact_match,
    f1,
    nearest_label,
    normalize_answer_it,
    squad_scores,
)
from cerbero_ray.evaluate.tasks import prepare
from conftest import SAMPLES

SQUAD_SLICE = f"{SAMPLES}/squad_it_sample.json"


@pytest.mark.parametrize(
    "pred,gold,em,f1_,em_it,f1_it",
    [
        # official: punctuation goes first, "l'ottobre" -> "lottobre": only 1973 shared, P 1/3 R 1/2
        ("l'ottobre del 1973", "ottobre 1973", 0, 0.4, 0, 0.8),
        ("Città del Vaticano", "città del vaticano.", 1, 1, 1, 1),  # case and final period
        ("Citta del Vaticano", "Città del Vaticano", 0, 2 / 3, 0, 2 / 3),  # accents are kept
        ("the Apollo program", "Apollo program", 1, 1, 0, 0.8),  # English articles: official only
        ("il programma Apollo", "programma Apollo", 0, 0.8, 1, 1),  # Italian articles: the variant only
        ("dell’Organizzazione", "Organizzazione", 0, 0, 1, 1),  # typographic apostrophe, elided form
        ("Roma!", "roma", 1, 1, 1, 1),
        ("", "Roma", 0, 0, 0, 0),
    ],
)
def test_squad_metrics_by_hand(pred, gold, em, f1_, em_it, f1_it):
    assert exact_match(pred, gold) == em and f1(pred, gold) == pytest.approx(f1_)
    assert exact_match(pred, gold, normalize_answer_it) == em_it
    assert f1(pred, gold, normalize_answer_it) == pytest.approx(f1_it)


def test_squad_takes_the_best_gold_and_counts_missing_predictions():
    golds = {"q1": ["ottobre 1973", "1973"], "q2": ["Roma"], "q3": ["Milano"]}
    assert best(exact_match, "1973", golds["q1"]) == 1
    s = squad_scores({"q1": "1973", "q2": "la città di Roma"}, golds)  # q3 has no prediction
    # q1: EM 1 F1 1; q2: EM 0, F1 P 1/4 R 1 = 0.4; q3: 0 -> means over 3 questions
    assert s["rows"] == 3 and s["em"] == pytest.approx(100 / 3) and s["f1"] == pytest.approx(140 / 3)
    # Italian: "la" dropped, P 1/3 R 1 = 0.5
    assert s["f1_it"] == pytest.approx(150 / 3)


def test_classification_scores_by_hand():
    # TP 2, FP 1, FN 1, TN 1: positive F1 2/3, negative F1 1/2, accuracy 3/5
    s = classification_scores([1, 0, 1, 1, 0], [1, 1, 0, 1, 0])
    assert s["f1"] == pytest.approx(200 / 3) and s["macro_f1"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)
    assert s["accuracy"] == pytest.approx(60.0) and s["rows"] == 5


@pytest.mark.parametrize(
    "answer,label",
    [("Sì", "yes"), ("si.", "yes"), ("SI", "yes"), ("No, non lo è", "no"), ("Nope", "no"), ("", "no"), ("yes", "no")],
)
def test_nearest_label_on_odd_answers(answer, label):
    # "" and "yes" are as far from "si" as from "no": the tie goes to the first label, "no"
    assert nearest_label(answer, {"no": "no", "yes": "si"}) == label


def test_clean_answer():
    assert squad.clean_answer(" Risposta breve: ottobre 1973\naltro") == "ottobre 1973"
    assert squad.clean_answer("Roma [|Umano|] e poi") == "Roma"
    assert squad.clean_answer("\nRisposta breve: x") == ""


def test_squad_shots_are_deterministic_and_from_other_articles():
    rows, rejects = squad.load(SQUAD_SLICE)
    assert len(rows) == 71 and not rejects
    for r in rows:
        shots = squad.shots_for(r, rows, 3, seed=0)
        assert shots == squad.shots_for(r, rows, 3, seed=0) and len(shots) == 3
        assert all(s["article"] != r["article"] and s["id"] != r["id"] for s in shots)
    p = prepare("squad_it", {"kind": "squad", "path": SQUAD_SLICE, "shots": 3, "max_rows": 20}, seed=0)
    assert (
        len(p.rows) == 20
        and p.rows
        == prepare("squad_it", {"kind": "squad", "path": SQUAD_SLICE, "shots": 3, "max_rows": 20}, seed=0).rows
    )
    for r in p.rows:
        user_turns = [m["content"] for m in r["messages"] if m["role"] == "user"]
        assert len(r["messages"]) == 7 and r["question"] in user_turns[-1]
        assert all(r["context"] not in t for t in user_turns[:-1])  # no shot holds the scored article
        assert r["messages"][1]["content"].startswith("Risposta breve: ")


def _evalita_files(tmp_path):
    ami = ["id\ttext\tmisogynous\taggressiveness"] + [f"{i}\ttesto numero {i}\t{i % 2}\t0" for i in range(30)]
    ami += ["99\t\t1\t0", "98\tsenza etichetta\tforse\t0", "97\tcampi\t1"]  # no text, bad gold, too few fields
    (tmp_path / "ami.tsv").write_text("\n".join(ami) + "\n")
    sp = ["id;origine;topic.politico;tweet;soggettivo;positivo;negativo;ironico;set"]
    sp += [
        f"{i};T;FALSE;tweet {i};TRUE;FALSE;{'TRUE' if i % 3 else 'FALSE'};FALSE;{'train' if i < 20 else 'test'}"
        for i in range(40)
    ]
    (tmp_path / "senti.csv").write_text("\n".join(sp) + "\n")
    return tmp_path / "ami.tsv", tmp_path / "senti.csv"


def test_evalita_pool_and_scored_rows_are_disjoint(tmp_path):
    ami, senti = _evalita_files(tmp_path)
    rows, rejects = evalita.load(evalita.SPECS["ami2020"], str(ami))
    assert len(rows) == 30 and sorted(r["reason"] for r in rejects) == ["bad_gold", "no_text", "wrong_field_count"]
    tc = {"kind": "ami2020", "path": str(ami), "shots": 5, "max_rows": None, "pool_rows": 10}
    p = prepare("ami2020", tc, seed=0)
    assert len(p.rows) == 20 and p.pool_rows == 10 and len(p.rejects) == 3
    assert not set(p.shots) & {r["id"] for r in p.rows}  # no scored row is a shot
    assert p.shots == prepare("ami2020", tc, seed=0).shots != prepare("ami2020", tc, seed=1).shots
    assert {s["label"] for s in p.task["few_shot"]} == {"yes", "no"} and len(p.task["few_shot"]) == 5
    assert p.rows[0]["messages"][0]["content"].startswith("Dato questo testo:\n")
    assert p.rows[0]["messages"][0]["content"].endswith("\nIl suo contenuto è misogino? (si/no)")
    s = prepare(
        "sentipolc", {"kind": "sentipolc", "path": str(senti), "shots": 5, "max_rows": None, "pool_rows": 1}, seed=0
    )
    assert len(s.rows) == 20 and all(int(i) < 20 for i in s.shots) and all(int(r["id"]) >= 20 for r in s.rows)


def test_config_errors_name_the_key(tmp_path, tiny_hf):
    base = [f"evaluate.checkpoints.tiny-cpu={tiny_hf}", f"evaluate.tasks.squad_it.path={SQUAD_SLICE}"]
    compose("evaluate", [*base, "evaluate.only=[squad_it]"], checked=True)
    for extra, msg in (
        (["evaluate.only=[squad_it]", "evaluate.tasks.squad_it.protocols=[score]"], "squad_it.protocols"),
        (["evaluate.only=[nope]"], "evaluate.only"),
        ([f"evaluate.tasks.ami2020.path={tmp_path}/none.tsv"], "evaluate.tasks.ami2020.path"),
        (["evaluate.only=[squad_it]", f"evaluate.checkpoints.tiny-cpu={tmp_path}"], "evaluate.checkpoints.tiny-cpu"),
        (["evaluate.only=[squad_it]", "evaluate.tasks.squad_it.kind=glue"], "evaluate.tasks.squad_it.kind"),
    ):
        with pytest.raises(ValueError, match=msg):
            compose("evaluate", [*base, *extra], checked=True)
    # a missing file is skipped, not an error, when asked
    compose(
        "evaluate",
        [*base, f"evaluate.tasks.ami2020.path={tmp_path}/none.tsv", "evaluate.skip_missing=true"],
        checked=True,
    )


def test_rescore_reads_the_official_formats(tmp_path):
    rows, _ = squad.load(SQUAD_SLICE)
    rows = [{**r, "gold": r["answers"]} for r in rows[:5]]
    preds = {rows[0]["id"]: rows[0]["gold"][0], rows[1]["id"]: "niente"}
    out = squad.rescore(json.loads(json.dumps(squad.subset(rows))), preds)
    assert out["exact_match"] == pytest.approx(20.0)
