"""The evaluation job end to end: all four tasks on small slices with two tiny checkpoints, the
tables, chart and per-row predictions written; SQuAD predictions rescored from the files give the
same EM/F1; a rerun resumes every (checkpoint, task); a bad config is one line before Ray starts."""

import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from cerbero_ray.config import REPO_DIR, compose, to_container
from cerbero_ray.evaluate import run_evaluate, squad
from conftest import SAMPLES

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def evalita_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("evalita")
    words = ["bello", "brutto", "ottimo", "pessimo", "così così", "davvero"]
    ami = ["id\ttext\tmisogynous\taggressiveness"]
    ami += [f"{i}\tfrase {words[i % 6]} numero {i}\t{i % 2}\t0" for i in range(40)]
    iro = ["id;text;irony;sarcasm;topic"] + [f"{i};che {words[i % 6]} giornata {i};{i % 2};0;T" for i in range(40)]
    sp = ["id;origine;topic.politico;tweet;soggettivo;positivo;negativo;ironico;set"]
    sp += [
        f"{i};T;FALSE;tweet {words[i % 6]} {i};TRUE;FALSE;{'TRUE' if i % 3 else 'FALSE'};FALSE;"
        f"{'train' if i < 20 else 'test'}"
        for i in range(44)
    ]
    sp += ["bad;T;FALSE;senza valore;TRUE;FALSE;boh;FALSE;test"]  # a malformed row: counted, not scored
    (d / "ami2020.tsv").write_text("\n".join(ami) + "\n")
    (d / "ironita.csv").write_text("\n".join(iro) + "\n")
    (d / "sentipolc.csv").write_text("\n".join(sp) + "\n")
    return d


@pytest.fixture(scope="module")
def second_hf(tmp_path_factory, tok):
    from cerbero_ray.models import tiny

    d = tmp_path_factory.mktemp("tiny_hf_b")
    tiny(seed=7).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def eval_cfg(out, a, b, data):
    return to_container(
        compose(
            "evaluate",
            [
                f"paths.output_dir={out}",
                "~evaluate.checkpoints.tiny-cpu",
                f"+evaluate.checkpoints.a={a}",
                f"+evaluate.checkpoints.b={b}",
                f"evaluate.tasks.squad_it.path={SAMPLES}/squad_it_sample.json",
                "evaluate.tasks.squad_it.max_rows=12",
                f"evaluate.tasks.ami2020.path={data}/ami2020.tsv",
                "evaluate.tasks.ami2020.pool_rows=10",
                f"evaluate.tasks.ironita.path={data}/ironita.csv",
                "evaluate.tasks.ironita.pool_rows=10",
                f"evaluate.tasks.sentipolc.path={data}/sentipolc.csv",
                "evaluate.tasks.sentipolc.max_rows=16",
                "evaluate.batch_rows=8",
                "evaluate.tasks.squad_it.max_new_tokens=8",
                "evaluate.tasks.ami2020.max_new_tokens=4",
                "evaluate.tasks.ironita.max_new_tokens=4",
                "evaluate.tasks.sentipolc.max_new_tokens=4",
            ],
        )
    )


def test_four_tasks_two_checkpoints(tmp_path, tiny_hf, second_hf, evalita_dir, ray_local, capsys):
    c = eval_cfg(tmp_path, tiny_hf, second_hf, evalita_dir)
    res = run_evaluate(c)
    out = c["evaluate"]["output_dir"]
    assert set(res["results"]) == {"a", "b"}
    assert res["tasks"]["sentipolc"]["rows"] == 16 and res["tasks"]["sentipolc"]["rejects"] == {"bad_gold": 1}
    assert res["tasks"]["ami2020"]["rows"] == 30 and res["tasks"]["squad_it"]["rows"] == 12
    for ck in ("a", "b"):
        r = res["results"][ck]
        assert set(r["squad_it"]) == {"generate"} and set(r["ami2020"]) == {"generate", "score"}
        for t in ("ami2020", "ironita", "sentipolc"):
            for proto in ("generate", "score"):
                assert set(r[t][proto]) >= {"f1", "macro_f1", "accuracy", "rows"}
        preds = pq.read_table(os.path.join(out, "runs", ck, "ironita", "predictions.parquet")).to_pylist()
        assert len(preds) == 60 and {p["protocol"] for p in preds} == {"generate", "score"}
        assert all(p["raw"] is not None for p in preds if p["protocol"] == "generate")
        assert all(0 <= p["p_yes"] <= 1 for p in preds if p["protocol"] == "score")
        # the official script's inputs give the same figures
        d = os.path.join(out, "runs", ck, "squad_it")
        rescored = subprocess.run(
            [sys.executable, "-m", "cerbero_ray.evaluate.squad", f"{d}/gold.json", f"{d}/predictions.json"],
            capture_output=True,
            text=True,
            check=True,
        )
        again = json.loads(rescored.stdout)
        assert again["exact_match"] == pytest.approx(r["squad_it"]["generate"]["em"])
        assert again["f1"] == pytest.approx(r["squad_it"]["generate"]["f1"])
    md = open(os.path.join(out, "results.md")).read()
    assert "| a |" in md and "| b | score |" in md and "cerbero-7b (published)" in md and "*always positive*" in md
    assert os.path.getsize(os.path.join(out, "results.png")) > 1000
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["results"] == res["results"] and saved["seed"] == 0
    capsys.readouterr()
    again = run_evaluate(c)  # every (checkpoint, task) resumes from its metrics.json
    assert "4 task(s) already done, 0 to go" in capsys.readouterr().out
    assert again["results"] == res["results"]


def test_job_refuses_a_bad_config_before_ray(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO_DIR, "jobs", "evaluate.py"),
            f"evaluate.checkpoints.tiny-cpu={tmp_path}/nothing",
            f"paths.output_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: evaluate.checkpoints.tiny-cpu")
    assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "evaluate")
    assert squad.ANSWER_PREFIX == "Risposta breve:"
