"""The evaluation stage's pure parts: SQuAD v1.1 metrics on hand-derived Italian cases, F1 equal
to scikit-learn's by hand, the nearest-label mapping, deterministic shots that never leak a scored
row, loaders that count malformed rows, and config errors that name the key."""

import json

import numpy as np
import pyarrow as pa
import pytest

from cerbero_ray.config import compose
from cerbero_ray.config.evaluate import EvalTaskConfig, EvaluateConfig
from cerbero_ray.evaluate import evalita, squad
from cerbero_ray.evaluate.metrics import (
    best,
    bootstrap,
    classification_scores,
    exact_match,
    f1,
    nearest_label,
    normalize_answer_it,
    paired_bootstrap,
    parse_yes_no,
    prefix_class,
    prompt_summary,
    report_scores,
    squad_scores,
    v2_rows,
)
from cerbero_ray.evaluate.tasks import prepare
from conftest import SAMPLES

SQUAD_SLICE = f"{SAMPLES}/squad_it_sample.json"


@pytest.mark.parametrize(
    "pred,gold,em,f1_,em_it,f1_it",
    [
        # official: punctuation goes first, "l'ottobre" -> "lottobre": only 1973 shared, P 1/3 R 1/2
        ("l'ottobre del 1973", "ottobre 1973", 0, 0.4, 1, 1),  # Italian: l' and del both go
        ("Città del Vaticano", "città del vaticano.", 1, 1, 1, 1),  # case and final period
        ("Citta del Vaticano", "Città del Vaticano", 0, 2 / 3, 0, 0.5),  # accents are kept; Italian: del goes
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


@pytest.mark.parametrize(
    "a,b,same",
    [
        ("dell'arte", "arte", True),  # elided articulated preposition
        ("della città", "città", True),  # and its full form: the same rule
        ("nella stanza", "nell'aula stanza", False),
        ("negli anni", "anni", True),
        ("Carlo I", "Carlo", False),  # an upper-case I is a numeral, not the article
        ("i Romani", "Romani", True),  # a lower-case i is the article
        ("1.000 euro", "1000 euro", True),  # punctuation deleted as the official script deletes it
        ("U.S.A.", "USA", True),
        ("«Roma»", "Roma", True),  # Unicode punctuation
        ("“Roma” – capitale…", "Roma capitale", True),
        ("citta\u0300", "città", True),  # NFC: a decomposed accent is the same letter
        ("l’Italia", "Italia", True),  # typographic apostrophe
        ("di Roma", "Roma", False),  # a simple preposition is content
    ],
)
def test_each_italian_normalisation_rule(a, b, same):
    assert (normalize_answer_it(a) == normalize_answer_it(b)) is same, (normalize_answer_it(a), normalize_answer_it(b))


def test_empty_gold_answers_count_as_the_official_script_counts_them():
    """An empty gold answer matches a prediction that normalises to nothing ("."), as in the
    official v1.1 script; a missing prediction scores 0, never EM 1 against an empty gold."""
    golds = {"d322": [""], "q2": ["", "Roma"], "q3": [""]}
    s = squad_scores({"d322": ".", "q2": "Roma"}, golds)  # q3: no prediction
    assert s["em"] == pytest.approx(200 / 3) and s["rows"] == 3


def test_squad_v2_against_the_first_gold():
    r = v2_rows({"a": "la città di Roma", "b": "", "c": "x", "d": ""}, {"a": "Roma", "b": "", "c": "", "d": "y"})
    assert r["exact"].tolist() == [0, 1, 0, 0]
    assert r["f1"][0] == pytest.approx(0.4) and r["f1"][1:].tolist() == [1, 0, 0]  # P 1/4 R 1; empty: only empty


@pytest.mark.parametrize(
    "answer,label,parsed",
    [
        ("Sì, è misogino", "yes", True),  # the first word, not the whole line
        ("si.", "yes", True),
        ("SI", "yes", True),
        ("No, non lo è", "no", True),
        ("no", "no", True),
        ("Nope", "no", False),  # unparsed: the nearest label by edit distance is the fallback
        ("", "no", False),
        ("Forse sì", "yes", False),  # first word neither: unparsed, then the nearest label
    ],
)
def test_yes_no_answers_are_read_from_their_first_word(answer, label, parsed):
    assert parse_yes_no(answer, {"no": "no", "yes": "si"}) == (label, parsed)


@pytest.mark.parametrize(
    "answer,cls",
    [
        ("MISOGINO", "MISOGINO"),
        ("NON_MISOGINO.", "NON_MISOGINO"),  # starts with a class
        ("NON_MIS", "NON_MISOGINO"),  # a start of a class
        ("misogino", "<UNKNOWN>"),  # case-sensitive, as benchita
        ("Credo di sì", "<UNKNOWN>"),
        ("", "NON_MISOGINO"),  # benchita's own behaviour: "" is a start of every class, the longest wins
    ],
)
def test_benchita_prefix_matching(answer, cls):
    assert prefix_class(answer, ["NON_MISOGINO", "MISOGINO"], "<UNKNOWN>") == cls


def test_figures_equal_scikit_learn():
    from sklearn.metrics import classification_report, f1_score

    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 200).tolist()
    pred = rng.integers(0, 3, 200).tolist()  # 2: unknown
    rep = classification_report(gold, pred, output_dict=True, zero_division=0)
    mine = report_scores(gold, pred)
    assert mine["macro_f1"] == pytest.approx(100 * rep["macro avg"]["f1-score"])
    assert mine["weighted_f1"] == pytest.approx(100 * rep["weighted avg"]["f1-score"])
    pred2 = [p % 2 for p in pred]
    c = classification_scores(gold, pred2)
    assert c["f1"] == pytest.approx(100 * f1_score(gold, pred2)) and c["macro_f1"] == pytest.approx(
        100 * f1_score(gold, pred2, average="macro")
    )


def test_bootstrap_intervals_are_seeded_hold_the_figure_and_narrow_with_rows():
    rng = np.random.default_rng(1)
    gold = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.8, gold, 1 - gold)  # 80% right
    small = bootstrap("binary", {"gold": gold[:50], "pred": pred[:50]}, 1000, seed=0)
    big = bootstrap("binary", {"gold": gold, "pred": pred}, 1000, seed=0)
    assert small == bootstrap("binary", {"gold": gold[:50], "pred": pred[:50]}, 1000, seed=0)
    acc = classification_scores(gold.tolist(), pred.tolist())["accuracy"]
    assert big["accuracy"][0] < acc < big["accuracy"][1]
    assert small["accuracy"][1] - small["accuracy"][0] > 1.8 * (big["accuracy"][1] - big["accuracy"][0])
    same = paired_bootstrap("binary", {"gold": gold, "pred": pred}, {"gold": gold, "pred": pred}, 200, 0)
    assert same["accuracy"] == {"diff": 0.0, "ci": [0.0, 0.0], "p_not_better": 1.0}
    better = paired_bootstrap("binary", {"gold": gold, "pred": pred}, {"gold": gold, "pred": gold}, 200, 0)
    assert (
        better["accuracy"]["diff"] > 15 and better["accuracy"]["ci"][0] > 10 and better["accuracy"]["p_not_better"] == 0
    )


def test_prompt_summary():
    s = prompt_summary([60.0, 70.0, 80.0])
    assert s["mean"] == 70 and s["std"] == pytest.approx(10) and s["best"] == 80 and s["best_prompt"] == 2
    assert s["combined"] == pytest.approx((1 - (80 - 70) / 100) * 80)


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
    tc = {"kind": "squad", "path": SQUAD_SLICE, "shots": 3, "max_rows": 20, "protocols": ["generate", "benchita"]}
    tc |= {"prompts": None, "max_new_tokens": 32}
    tc = EvalTaskConfig(**tc)
    p = prepare("squad_it", tc, seed=0)
    assert len(p.rows) == 20 and p.rows == prepare("squad_it", tc, seed=0).rows
    assert [u.key for u in p.units] == ["generate/0", "generate/1", "benchita/0"]
    g0, g1, b = p.units
    for row, req in zip(p.rows, g0.requests):
        user_turns = [m["content"] for m in req["messages"] if m["role"] == "user"]
        assert len(req["messages"]) == 7 and row["question"] in user_turns[-1]
        assert all(row["context"] not in t for t in user_turns[:-1])  # no shot holds the scored article
        assert req["messages"][1]["content"].startswith("Risposta breve: ")
    assert not g1.requests[0]["messages"][1]["content"].startswith("Risposta breve")  # the second wording
    assert b.requests[0]["messages"][0]["role"] == "system" and b.max_new_tokens == 100 and not b.stop_at_newline
    assert len({g0.prompt_hash(), g1.prompt_hash(), b.prompt_hash()}) == 3


def test_a_task_file_compressed_is_the_same_task(tmp_path):
    """A task's file read as every input is (compression by its first bytes, whatever its name): a
    gzip of the SQuAD-it slice, named .json.gz or plain .json, is the same task, with the same
    identity (the contents' hash, from the same one read)."""
    import gzip

    from cerbero_ray import inputs

    packed = gzip.compress(open(SQUAD_SLICE, "rb").read())
    (tmp_path / "squad.json.gz").write_bytes(packed)
    (tmp_path / "squad.json").write_bytes(packed)  # a gzip under a plain name
    tc = {"kind": "squad", "shots": 1, "max_rows": 5, "protocols": ["generate"], "prompts": [0], "max_new_tokens": 8}
    plain = prepare("squad_it", EvalTaskConfig(path=SQUAD_SLICE, **tc), seed=0)
    for name in ("squad.json.gz", "squad.json"):
        p = prepare("squad_it", EvalTaskConfig(path=str(tmp_path / name), **tc), seed=0)
        assert p.rows == plain.rows and p.file_sha256 == plain.file_sha256 == inputs.file_hash(SQUAD_SLICE)
        assert p.units[0].prompt_hash() == plain.units[0].prompt_hash()
    ami, _ = _evalita_files(tmp_path)
    (tmp_path / "ami.tsv.gz").write_bytes(gzip.compress(ami.read_bytes()))
    assert evalita.load(evalita.SPECS["ami2020"], str(tmp_path / "ami.tsv.gz")) == evalita.load(
        evalita.SPECS["ami2020"], str(ami)
    )


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
    tc = {"kind": "ami2020", "path": str(ami), "shots": 5, "max_rows": None, "pool_rows": 10, "prompts": None}
    tc |= {"protocols": ["generate", "score", "benchita"], "max_new_tokens": 32}
    p = prepare("ami2020", EvalTaskConfig(**tc), seed=0)
    assert len(p.rows) == 20 and p.pool_rows == 10 and len(p.rejects) == 3
    assert len(p.shots) == 3 and not {i for d in p.shots for i in d} & {r["id"] for r in p.rows}  # pool only
    assert p.shots == prepare("ami2020", EvalTaskConfig(**tc), seed=0).shots
    assert p.shots != prepare("ami2020", EvalTaskConfig(**tc), seed=1).shots
    pool = [r for r in rows if r["id"] not in {x["id"] for x in p.rows}]
    assert p.shots[0] == [r["id"] for r in evalita.pick_shots(pool, 5, 0)]  # draw 0: the earlier runs' shots
    assert len({tuple(d) for d in p.shots}) == 3  # three different sets
    keys = [u.key for u in p.units]
    wordings = [f"{w}{d}" for d in ("", "#1", "#2") for w in ("/0", "/1", "/2")]
    assert keys == [f"generate{w}" for w in wordings] + [f"score{w}" for w in wordings] + ["benchita/0"]
    assert [u.draw for u in p.units[:9]] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for u in p.units[9:18]:  # each score unit's shots are its draw's, both answers in each
        assert [s["text"] for s in u.task["few_shot"]] == [
            next(r["text"] for r in rows if r["id"] == i) for i in p.shots[u.draw]
        ]
        assert {s["label"] for s in u.task["few_shot"]} == {"yes", "no"}
    score = p.units[9]
    assert {s["label"] for s in score.task["few_shot"]} == {"yes", "no"} and len(score.task["few_shot"]) == 5
    first = p.units[0].requests[0]["messages"][-1]["content"]
    assert first.startswith("Dato questo testo:\n") and first.endswith("\nIl suo contenuto è misogino? (si/no)")
    bench = p.units[-1].requests[0]["messages"]
    assert bench[0]["role"] == "system" and "MISOGINO" in bench[0]["content"]
    assert {m["content"] for m in bench[1:-1] if m["role"] == "assistant"} <= {"MISOGINO", "NON_MISOGINO"}
    pool_texts = {r["text"] for r in rows} - {r["text"] for r in p.rows}
    assert all(m["content"] in pool_texts for m in bench[1:-1] if m["role"] == "user")  # shots from the pool
    s = prepare(
        "sentipolc",
        EvalTaskConfig(**{**tc, "kind": "sentipolc", "path": str(senti), "pool_rows": 1, "prompts": [0]}),
        seed=0,
    )
    assert (
        len(s.rows) == 20 and all(int(i) < 20 for d in s.shots for i in d) and all(int(r["id"]) >= 20 for r in s.rows)
    )
    assert [u.key for u in s.units] == [
        "generate/0",
        "generate/0#1",
        "generate/0#2",
        "score/0",
        "score/0#1",
        "score/0#2",
        "benchita/0",
    ]
    one = prepare(
        "sentipolc",
        EvalTaskConfig(**{**tc, "kind": "sentipolc", "path": str(senti), "shot_draws": 1, "prompts": [0]}),
        0,
    )
    assert [u.key for u in one.units] == ["generate/0", "score/0", "benchita/0"] and one.shots == s.shots[:1]
    zero = prepare(
        "sentipolc", EvalTaskConfig(**{**tc, "kind": "sentipolc", "path": str(senti), "shots": 0, "prompts": [0]}), 0
    )
    assert [u.key for u in zero.units] == ["generate/0", "score/0", "benchita/0"]  # 0-shot: nothing to draw


def test_the_choice_protocol_asks_what_generate_asks_with_the_answer_held_to_si_or_no(tmp_path, tiny_hf):
    """``choice``: the generate unit's very requests, the answer constrained to the verbalizers, a
    unit of its own (its own key and prompt hash); on the HF engine every answer is si or no, read
    as generate's are, and none is unparsed."""
    from cerbero_ray.evaluate.backends import ModelRun
    from cerbero_ray.evaluate.pipeline import _requests
    from cerbero_ray.evaluate.reading import read_unit
    from cerbero_ray.evaluate.worker import EvalWorker

    ami, _ = _evalita_files(tmp_path)
    tc = {"kind": "ami2020", "path": str(ami), "shots": 2, "max_rows": 8, "pool_rows": 10, "prompts": [0]}
    tc |= {"protocols": ["generate", "choice"], "max_new_tokens": 6, "shot_draws": 1}
    p = prepare("ami2020", EvalTaskConfig(**tc), seed=0)
    gen, choice = p.units
    assert (gen.key, choice.key) == ("generate/0", "choice/0") and choice.choices == ["si", "no"]
    assert choice.requests == gen.requests and choice.prompt_hash() != gen.prompt_hash()
    rows = _requests({"ami2020": p.units})
    assert {r["choices"] for r in rows} == {None, '["si", "no"]'}
    ec = EvaluateConfig(output_dir=str(tmp_path))
    worker = EvalWorker(ModelRun.of(ec, tiny_hf, max_new_tokens=6))
    out = worker(pa.Table.from_pylist(rows))
    answers = {(u, i): raw for u, i, raw in zip(out["unit"], out["id"], out["raw"])}
    assert {answers[("choice/0", r["id"])] for r in choice.requests} <= {"si", "no"}
    outs = {r["id"]: {"raw": answers[("choice/0", r["id"])], "p_yes": None, "truncated": False} for r in p.rows}
    _, _, counts = read_unit(p, choice, outs)
    assert counts["unparsed"] == 0


def test_per_row_shots_give_each_row_its_own_examples(tmp_path):
    """``shot_mode=per_row`` (lm-evaluation-harness's way): one unit per wording, every row's request
    with its own seeded shots (both answers), a score row carrying its own label task."""
    _, senti = _evalita_files(tmp_path)
    tc = {"kind": "sentipolc", "path": str(senti), "shots": 4, "max_rows": None, "pool_rows": 1, "prompts": [0, 1]}
    tc |= {"protocols": ["generate", "score"], "max_new_tokens": 8, "shot_mode": "per_row"}
    p = prepare("sentipolc", EvalTaskConfig(**tc), seed=0)
    assert [u.key for u in p.units] == ["generate/0", "generate/1", "score/0", "score/1"] and p.shots == []
    score = p.units[2]
    assert score.task is None and all("task" in r for r in score.requests)
    sets = [tuple(s["text"] for s in r["task"]["few_shot"]) for r in score.requests]
    assert len(set(sets)) > len(sets) // 2  # rows differ in their shots
    assert all({s["label"] for s in r["task"]["few_shot"]} == {"yes", "no"} for r in score.requests)
    gen = p.units[0].requests[0]["messages"]
    assert [m["content"] for m in gen if m["role"] == "user"][:-1] != [
        m["content"] for m in p.units[0].requests[1]["messages"] if m["role"] == "user"
    ][:-1]
    again = prepare("sentipolc", EvalTaskConfig(**tc), seed=0)
    assert [r["task"] for r in again.units[2].requests] == [r["task"] for r in score.requests]  # seeded


def test_duplicate_ids_are_counted_rejects(tmp_path):
    """The shared SENTIPOLC test split repeats 5 ids: every figure must cover the same rows."""
    ami = ["id\ttext\tmisogynous\taggressiveness"] + [f"{i % 8}\ttesto {i}\t{i % 2}\t0" for i in range(10)]
    (tmp_path / "dup.tsv").write_text("\n".join(ami) + "\n")
    rows, rejects = evalita.load(evalita.SPECS["ami2020"], str(tmp_path / "dup.tsv"))
    assert [r["id"] for r in rows] == [str(i) for i in range(8)]
    assert [(r["id"], r["reason"]) for r in rejects] == [("0", "duplicate_id"), ("1", "duplicate_id")]


def test_the_shared_sentipolc_file_has_duplicates_and_they_are_rejected():
    import os

    from conftest import SHARED_DATA

    path = os.path.join(SHARED_DATA, "evalita", "sentipolc.csv")
    if not os.path.exists(path):
        pytest.skip("../shared/data is not here")
    rows, rejects = evalita.load(evalita.SPECS["sentipolc"], path)
    test = [r for r in rows if r["split"] == "test"]
    assert len({r["id"] for r in rows}) == len(rows)  # unique now
    assert sum(r["reason"] == "duplicate_id" for r in rejects) >= 5 and len(test) < 1935


def test_config_errors_name_the_key(tmp_path, tiny_hf):
    base = [f"evaluate.checkpoints.tiny-cpu={tiny_hf}", f"evaluate.tasks.squad_it.path={SQUAD_SLICE}"]
    compose("evaluate", [*base, "evaluate.only=[squad_it]"], checked=True)
    for extra, msg in (
        (["evaluate.only=[squad_it]", "evaluate.tasks.squad_it.protocols=[score]"], "squad_it.protocols"),
        (["evaluate.only=[squad_it]", "evaluate.tasks.squad_it.prompts=[2]"], "squad_it.prompts"),
        (["evaluate.only=[squad_it]", "evaluate.bootstrap=-1"], "evaluate.bootstrap"),
        (["evaluate.only=[squad_it]", "evaluate.seed=-1"], "evaluate.seed must be >= 0"),  # was a numpy traceback
        (["evaluate.only=[nope]"], "evaluate.only"),
        ([f"evaluate.tasks.ami2020.path={tmp_path}/none.tsv"], "evaluate.tasks.ami2020.path"),
        (["evaluate.only=[squad_it]", f"evaluate.checkpoints.tiny-cpu={tmp_path}"], "evaluate.checkpoints.tiny-cpu"),
        (["evaluate.only=[squad_it]", "evaluate.tasks.squad_it.kind=glue"], "evaluate.tasks.squad_it.kind"),
        (["evaluate.only=[squad_it]", "evaluate.tasks.squad_it.shot_draws=0"], "squad_it.shot_draws must be >= 1"),
        (["evaluate.only=[squad_it]", "evaluate.tasks.squad_it.shot_mode=each"], "squad_it.shot_mode must be one of"),
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


def test_two_shot_draws_on_the_shared_sentipolc_predict_differently(tok):
    """On ../shared's SENTIPOLC (40 test rows, 5-shot, two draws, the score protocol) the tiny model's
    per-row prediction (``p_yes``, the score protocol's column of predictions.parquet) moves with the
    draw for every row, and the whole batch shifts one way: a fixed set of shots is a bias on every
    answer (the issue's 5-shot model said "no" to 1,999 of 2,000), which is why every figure is the
    mean over draws. (A random model sits at p_yes ≈ 0.48 whatever the shots, so the thresholded
    class seldom flips here; the pipeline test checks the tables over draws.)"""
    import os

    from cerbero_ray.config.label_task import LabelTask
    from cerbero_ray.inference.scorer import Scorer
    from cerbero_ray.models import tiny
    from conftest import SHARED_DATA

    path = os.path.join(SHARED_DATA, "evalita", "sentipolc.csv")
    if not os.path.exists(path):
        pytest.skip("../shared/data is not here")
    tc = {"kind": "sentipolc", "path": path, "shots": 5, "max_rows": 40, "prompts": [0], "protocols": ["score"]}
    p = prepare("sentipolc", EvalTaskConfig(**tc, shot_draws=2), seed=0)
    assert [u.key for u in p.units] == ["score/0", "score/0#1"] and p.shots[0] != p.shots[1]
    model = tiny().eval()
    texts = [r["text"] for r in p.units[0].requests]
    p_yes = [[s["probs"]["yes"] for s in Scorer(model, tok, LabelTask(**u.task)).score(texts)] for u in p.units]
    diffs = [b - a for a, b in zip(*p_yes)]
    assert all(abs(d) > 1e-4 for d in diffs)
    assert all(d > 0 for d in diffs) or all(d < 0 for d in diffs)  # a shift of the whole batch
    # the generate protocol's answers (its per-row prediction, before reading si/no) move too
    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.sampling import Sampling

    gen = prepare("sentipolc", EvalTaskConfig(**{**tc, "protocols": ["generate"]}, shot_draws=2), seed=0)
    cb = ContinuousBatcher(model, tok, num_slots=8, max_prompt_tokens=2048, max_new_tokens=4)
    s = Sampling(max_new_tokens=4, temperature=0.0, stop=())
    answers = [
        [
            r["text"]
            for r in cb.generate(
                [
                    tok.apply_chat_template(q["messages"], tokenize=False, add_generation_prompt=True)
                    for q in u.requests
                ],
                s,
            )
        ]
        for u in gen.units
    ]
    assert sum(a != b for a, b in zip(*answers)) >= len(texts) // 4


def test_per_row_score_requests_are_scored_under_their_own_task(tmp_path, tiny_hf):
    """The model actor's path for ``shot_mode=per_row``: each score request names its own label task
    (``scorer``), and its p(yes) is the one a scorer of that task gives; draws keep their own."""
    import pyarrow as pa

    from cerbero_ray.config.label_task import LabelTask
    from cerbero_ray.evaluate.backends import ModelRun
    from cerbero_ray.evaluate.pipeline import _requests
    from cerbero_ray.evaluate.worker import EvalWorker
    from cerbero_ray.inference.scorer import Scorer

    _, senti = _evalita_files(tmp_path)
    tc = {"kind": "sentipolc", "path": str(senti), "shots": 3, "max_rows": 4, "pool_rows": 1, "prompts": [0]}
    tc |= {"protocols": ["score"], "max_new_tokens": 4, "shot_mode": "per_row"}
    per_row = prepare("sentipolc", EvalTaskConfig(**tc), seed=0)
    drawn = prepare("sentipolc", EvalTaskConfig(**{**tc, "shot_mode": "draws", "shot_draws": 2}), seed=0)
    todo = {"per_row": per_row.units, "drawn": drawn.units}
    items = _requests(todo)
    tasks = {f"drawn/{u.key}": u.task for u in drawn.units}
    tasks |= {f"per_row/{u.key}/{r['id']}": r["task"] for u in per_row.units for r in u.requests}
    assert {i["scorer"] for i in items} == set(tasks)
    run = ModelRun(tiny_hf, "float32", 4, 1024, 8192, 1, 0.0, 1.0, None, "K", 1, 4, tasks)
    w = EvalWorker(run)
    out = w(pa.Table.from_pylist(items))
    for item, p_yes in zip(items, out["p_yes"]):
        want = Scorer(w.model, w.tok, LabelTask(**tasks[item["scorer"]])).score([item["text"]])[0]["probs"]["yes"]
        assert p_yes == pytest.approx(want, abs=1e-5), item["scorer"]


def test_a_checkpoint_written_again_under_its_path_is_evaluated_again(tmp_path):
    """A (checkpoint, task)'s results are keyed on what the checkpoint holds, not only its path:
    a model trained again under the same name is evaluated again (that an unchanged one resumes:
    tests/test_evaluate_pipeline.py)."""
    from cerbero_ray import storage
    from cerbero_ray.evaluate.pipeline import model_identity

    ck = tmp_path / "hf"
    ck.mkdir()
    ec = compose("evaluate", [f"paths.output_dir={tmp_path}"]).evaluate
    (ck / "model.safetensors").write_bytes(b"a" * 100)
    storage.mark_complete(str(ck))
    first = model_identity(ec, str(ck))
    assert model_identity(ec, str(ck)) == first and first["checkpoint"] == str(ck)
    storage.mark_complete(str(ck))  # written again
    assert model_identity(ec, str(ck)) != first
    assert model_identity(ec, "http://127.0.0.1:8000/v1")["version"] is None  # what an endpoint serves is its own


@pytest.fixture
def endpoint(monkeypatch):
    """``serve(handler)``: an http(s)://…/v1 URL answered by ``handler(method, path) -> (status,
    headers, body bytes or None: the connection dropped)``, on loopback; retries without waiting."""
    import http.server
    import threading

    from cerbero_ray.evaluate import backends

    monkeypatch.setattr(backends, "RETRY_WAITS", (0.0,) * 6)
    servers = []

    def serve(handler):
        class H(http.server.BaseHTTPRequestHandler):
            def _any(self):
                if self.command == "POST":
                    self.rfile.read(int(self.headers["Content-Length"]))
                status, headers, body = handler(self.command, self.path)
                if body is None:
                    self.close_connection = True
                    return
                self.send_response(status)
                for k, v in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _any

            def log_message(self, *a):
                pass

        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_port}/v1"

    yield serve
    for s in servers:
        s.shutdown()


def _endpoint_run(url: str, **kw):
    from cerbero_ray.evaluate.backends import ModelRun

    return ModelRun.of(EvaluateConfig(**kw), url)


def _chat_row():
    return {
        "text": None,
        "messages": [{"role": "user", "content": "Ciao"}],
        "max_new_tokens": 4,
        "stop_at_newline": True,
    }


def test_the_first_failed_request_stops_the_others_at_once(endpoint):
    """A row the endpoint fails (a 500) while the rows before it wait to be tried again (503s with
    a Retry-After of 30 s): the evaluation stops in one line at once, naming the failure; the
    waiting requests give up and the rows not yet sent are never sent."""
    import time

    from cerbero_ray.evaluate.backends import EndpointError, EndpointRunner

    models = json.dumps({"data": [{"id": "m"}]}).encode()
    posts = []

    def handler(method, path):
        if method == "GET":
            return 200, {}, models
        posts.append(path)
        if len(posts) == 4:
            time.sleep(0.5)  # after the others are answered 503 and wait
            return 500, {}, b"{}"
        return 503, {"Retry-After": "30"}, b""

    run = EndpointRunner(endpoint(handler), _endpoint_run("x", endpoint_concurrency=8))
    start = time.monotonic()
    with pytest.raises(EndpointError, match=r"/v1/chat/completions: 500 Internal Server Error$"):
        run.run([_chat_row() for _ in range(40)])
    assert time.monotonic() - start < 20  # not the 30 s the busy rows were told to wait
    assert len(posts) == 8  # the first 8, each once: no second try, none of the 32 queued rows


def test_an_endpoint_that_cannot_be_asked_stops_in_one_line(endpoint):
    """Nothing listening, a key refused, no model listed, an answer that is not JSON or not the
    OpenAI shape, a server error: each an EndpointError naming the URL (the job's one line), never
    a traceback or a wrong figure; a busy answer is tried 7 times before it is one."""
    import socket

    from cerbero_ray.evaluate.backends import EndpointError, EndpointRunner

    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(EndpointError, match=rf"127.0.0.1:{closed}/v1/models: .*refused on each of 7 tries"):
        EndpointRunner(f"http://127.0.0.1:{closed}/v1", _endpoint_run("x"))
    models = json.dumps({"data": [{"id": "m"}]}).encode()
    cases = {
        "key": (lambda m, p: (401, {}, b"{}"), r"/v1: 401 Unauthorized; the key comes from \$OPENAI_API_KEY"),
        "no model": (lambda m, p: (200, {}, b'{"data": []}'), r"/v1/models named no model"),
        "no route": (lambda m, p: (404, {}, b"{}"), r"/v1/models: 404 Not Found; name the model"),
        "html": (lambda m, p: (200, {}, b"<html>"), r"/v1/models: answered b'<html>', not JSON"),
    }
    for handler, says in cases.values():
        with pytest.raises(EndpointError, match=says):
            EndpointRunner(endpoint(handler), _endpoint_run("x"))
    tries = []

    def busy(method, path):
        if method == "GET":
            return 200, {}, models
        tries.append(path)
        return 503, {"Retry-After": "0"}, b""

    run = EndpointRunner(endpoint(busy), _endpoint_run("x"))
    with pytest.raises(EndpointError, match=r"/v1/chat/completions: 503 Service Unavailable on each of 7 tries"):
        run.run([_chat_row()])
    assert len(tries) == 7
    for status, body, says in [
        (500, b"{}", r"/v1/chat/completions: 500 Internal Server Error$"),
        (200, b'{"id": 1}', r"/v1/chat/completions: answered \{\"id\": 1\}, not what it reads"),
    ]:
        run = EndpointRunner(
            endpoint(lambda m, p, s=status, b=body: (200, {}, models) if m == "GET" else (s, {}, b)), _endpoint_run("x")
        )
        with pytest.raises(EndpointError, match=says):
            run.run([_chat_row()])


def test_results_md_says_which_test_sets_each_trained_model_s_data_was_checked_against(tmp_path):
    """A model trained by cerbero-ray: its run's summary.json records the data stage's dedup block,
    found from the checkpoint's place (hf/, adapter/, a checkpoint's); results.md says per task
    whether the data was checked against that very file (its contents' hash, as the evaluation's own:
    a gzip of it is the same file), a file of its name with other contents, and what it cost."""
    import gzip

    from cerbero_ray import inputs, storage
    from cerbero_ray.evaluate.report import contamination_table
    from cerbero_ray.tracking import training_data_of

    squad = tmp_path / "data" / "squad.json"
    storage.write_bytes(str(squad), b'{"data": []}')
    mine = inputs.file_hash(str(squad))
    gzipped = storage.write_bytes(str(tmp_path / "data" / "squad.json.gz"), gzip.compress(b'{"data": []}'))
    other = storage.write_bytes(str(tmp_path / "v2" / "squad.json"), b'{"data": [] }')
    assert inputs.file_hash(gzipped) == mine != inputs.file_hash(other)
    run = tmp_path / "train" / "demo"
    dedup = {"mode": "exact", "evaluation_sets": {"/elsewhere/squad.json": 3}, "ngram": 13, "min_words": 8}
    dedup["evaluation_sha256"] = {"/elsewhere/squad.json": mine}  # moved since: the same bytes
    storage.write_json(str(run / "summary.json"), {"steps": 8, "data": {"dir": "/d", "dedup": dedup}})
    for folder in (run / "hf", run / "adapter", run / "checkpoint_step_0000004" / "hf"):
        assert training_data_of(str(folder)) == {"dir": "/d", "dedup": dedup}
    assert training_data_of(str(tmp_path / "base-model")) is None  # not one of ours
    assert training_data_of(str(tmp_path / "other" / "hf")) is None  # no summary there
    # the model's own card records it too (its metadata): a folder copied out of its run, an export
    # folder's GGUF file; the card is read first
    from cerbero_ray.cards import CARD, data_record, front_matter

    card = "\n".join([*front_matter(license="mit", cerbero_ray=data_record(dedup)), "# m", ""])
    by_card = {"dedup": {**data_record(dedup)["data"]["dedup"]}}
    assert by_card["dedup"]["evaluation_sha256"] == {"squad.json": mine}
    for where in (tmp_path / "copied" / "model", tmp_path / "export", run / "hf"):
        storage.write_bytes(str(where / CARD), card.encode())
    assert training_data_of(str(tmp_path / "copied" / "model")) == by_card
    assert training_data_of(str(run / "hf")) == by_card and training_data_of(str(run / "adapter"))["dir"] == "/d"
    # a GGUF file: its own metadata, as the export stage writes it (after the vocabulary's arrays
    # here, as llama.cpp's quantizer leaves it: read past them), whatever the folder's card says (an
    # adapter's base file has none)
    import gguf

    from cerbero_ray.cards import GGUF_KEY

    def gguf_file(path, data=None, tokens=1000):
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_token_list([f"t{i}" for i in range(tokens)])
        w.add_token_scores([0.0] * tokens)
        if data is not None:
            w.add_string(GGUF_KEY, data if isinstance(data, str) else json.dumps(data))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.close()
        return str(path)

    assert training_data_of(gguf_file(tmp_path / "export" / "m-Q4_K_M.gguf", by_card)) == by_card
    assert training_data_of(gguf_file(tmp_path / "export" / "m-base-F16.gguf")) is None  # the card is not its
    for bad in ('{"dedup": 3}', "{cut", "[" * 100_000):  # a record results.md cannot read: none
        assert training_data_of(gguf_file(tmp_path / "bad.gguf", bad)) is None
    # after a vocabulary of 200,000 tokens (llama.cpp's quantizer moves it there): past the first MiB, found
    assert training_data_of(gguf_file(tmp_path / "far.gguf", by_card, tokens=200_000)) == by_card
    cut = tmp_path / "cut.gguf"  # a file cut short inside its metadata
    cut.write_bytes(open(tmp_path / "far.gguf", "rb").read()[: 3 << 20])
    assert training_data_of(str(cut)) is None
    storage.write_bytes(str(tmp_path / "junk.gguf"), b"GGUF" + b"\xff" * 64)  # not a GGUF file
    assert training_data_of(str(tmp_path / "junk.gguf")) is None and training_data_of("/no/such.gguf") is None
    junk = [
        "---\ncerbero_ray: [1]\n---\n",
        "---\n: : :\n---\n",
        "no metadata",
        "---\ncerbero_ray:\n  data:\n    dedup: 3\n---\n",
        "---\ncerbero_ray:\n  data:\n    dedup:\n      evaluation_sets: squad.json\n---\n",
        "---\ncerbero_ray:\n  data:\n    dedup:\n      evaluation_sets:\n        squad.json: many\n---\n",
        "---\ncerbero_ray:\n  data:\n    dedup:\n      evaluation_sha256: [1]\n---\n",
    ]
    for text in junk:  # a card that says nothing, or nothing results.md can read: as if none
        storage.write_bytes(str(tmp_path / "copied" / "model" / CARD), text.encode())
        assert training_data_of(str(tmp_path / "copied" / "model")) is None, text
    storage.write_bytes(str(run / "adapter" / CARD), junk[-1].encode())  # in a run: its summary says it
    assert training_data_of(str(run / "adapter"))["dir"] == "/d"
    ec = EvaluateConfig(
        output_dir=str(tmp_path),
        tasks={
            "squad_it": EvalTaskConfig(kind="squad", path=str(squad)),
            "ironita": EvalTaskConfig(kind="ironita", path="/data/evalita/ironita.csv"),
        },
    )
    gz = {  # another version of the set, in a bucket, compressed
        "mode": "exact",
        "evaluation_sets": {"s3://b/squad.json.gz": 5},
        "evaluation_sha256": {"s3://b/squad.json.gz": "0" * 16},
    }
    older = {"mode": "exact", "evaluation_sets": {"/x/squad.json": 2}}  # a record from before the hashes
    carded = by_card["dedup"]  # a card's record: file names for paths
    results = {
        "tasks": {"squad_it": {"file_sha256": mine}, "ironita": {"file_sha256": "1" * 16}},
        "training_data": {
            "trained": {"dedup": dedup},
            "carded": {"dedup": carded},
            "gz": {"dedup": gz},
            "older": {"dedup": older},
            "none": {"dedup": None},
        },
    }
    table = contamination_table(results, ec)
    assert table[:7] == [
        "| Model | squad_it | ironita |",
        "|---|---|---|",
        "| trained | checked (3 dropped) | not checked |",
        "| carded | checked (3 dropped) | not checked |",
        "| gz | another squad.json checked (5 dropped) | not checked |",
        "| older | checked, by name (2 dropped) | not checked |",
        "| none | not checked | not checked |",
    ]
    assert contamination_table({**results, "training_data": {}}, ec) == []  # no model of ours: no section
