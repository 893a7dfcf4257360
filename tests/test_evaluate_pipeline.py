"""The evaluation job end to end: all four tasks on small slices with two tiny checkpoints, the
tables, chart and per-row predictions written; SQuAD predictions rescored from the files give the
same EM/F1; a rerun resumes every (checkpoint, task); a bad config is one line before Ray starts."""

import contextlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from cerbero_ray.config import REPO_DIR, compose, to_container
from cerbero_ray.evaluate import run_evaluate, squad
from conftest import PATHS, SAMPLES

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
                "evaluate.tasks.ami2020.max_rows=16",
                f"evaluate.tasks.ironita.path={data}/ironita.csv",
                "evaluate.tasks.ironita.pool_rows=10",
                "evaluate.tasks.ironita.max_rows=16",
                f"evaluate.tasks.sentipolc.path={data}/sentipolc.csv",
                "evaluate.tasks.sentipolc.max_rows=16",
                "evaluate.batch_rows=8",
                "evaluate.tasks.squad_it.max_new_tokens=8",
                "evaluate.tasks.ami2020.max_new_tokens=4",
                "evaluate.tasks.ironita.max_new_tokens=4",
                "evaluate.tasks.sentipolc.max_new_tokens=4",
                # shot draws: one for AMI (its three wordings), two for IronITA and SENTIPOLC (one wording)
                "evaluate.tasks.ami2020.shot_draws=1",
                "evaluate.tasks.ironita.prompts=[0]",
                "evaluate.tasks.sentipolc.prompts=[0]",
                "evaluate.tasks.ironita.shot_draws=2",
                "evaluate.tasks.sentipolc.shot_draws=2",
            ],
        )
    )


def test_four_tasks_two_checkpoints(tmp_path, tiny_hf, second_hf, evalita_dir, ray_local, caplog):
    c = eval_cfg(tmp_path, tiny_hf, second_hf, evalita_dir)
    res = run_evaluate(c)
    out = c["evaluate"]["output_dir"]
    assert set(res["results"]) == {"a", "b"}
    assert res["tasks"]["sentipolc"]["rows"] == 16 and res["tasks"]["sentipolc"]["rejects"] == {"bad_gold": 1}
    assert res["tasks"]["ami2020"]["rows"] == 16 and res["tasks"]["squad_it"]["rows"] == 12
    evalita_units = {"generate/0", "generate/1", "generate/2", "score/0", "score/1", "score/2", "benchita/0"}
    drawn = {"generate/0", "generate/0#1", "score/0", "score/0#1", "benchita/0"}
    for ck in ("a", "b"):
        r = res["results"][ck]
        assert set(r["squad_it"]) == {"generate/0", "generate/1", "benchita/0"} and set(r["ami2020"]) == evalita_units
        assert set(r["ironita"]) == set(r["sentipolc"]) == drawn
        for t in ("ami2020", "ironita", "sentipolc"):
            for key, u in r[t].items():
                figures = {"macro_f1", "weighted_f1", "accuracy"} if key.startswith("benchita") else {"f1", "macro_f1"}
                assert figures <= set(u) and set(u["ci"]) >= figures and u["rows"] == res["tasks"][t]["rows"]
                for f in figures:
                    assert u["ci"][f][0] <= u[f] <= u["ci"][f][1], (t, key, f)
            assert 0 <= r[t]["generate/0"]["unparsed"] <= r[t]["generate/0"]["rows"]
        over = res["over_prompts"][ck]["ami2020"]["generate"]["f1"]
        assert over["prompts"] == 3 and over["best"] >= over["mean"] and 0 <= over["best_prompt"] < 3
        preds = pq.read_table(os.path.join(out, "runs", ck, "ironita", "predictions.parquet")).to_pylist()
        assert len(preds) == 16 * 5 and {p["protocol"] for p in preds} == {"generate", "score", "benchita"}
        assert {(p["protocol"], p["draw"]) for p in preds} == {
            (x, d) for x in ("generate", "score") for d in (0, 1)
        } | {("benchita", 0)}
        # rescoring from the per-row predictions (draw index kept) gives every unit's figures
        from sklearn.metrics import f1_score

        for t in ("ironita", "sentipolc", "ami2020"):
            rows = pq.read_table(os.path.join(out, "runs", ck, t, "predictions.parquet")).to_pylist()
            for key, u in r[t].items():
                if key.startswith("benchita"):
                    continue
                mine = [
                    x
                    for x in rows
                    if (x["protocol"], x["prompt"], x["draw"]) == (u["protocol"], u["prompt"], u["draw"])
                ]
                gold, pred = [x["gold_class"] for x in mine], [x["pred_class"] for x in mine]
                assert len(mine) == u["rows"]
                assert u["macro_f1"] == pytest.approx(
                    100 * f1_score(gold, pred, average="macro", zero_division=0), abs=1e-3
                )
        over = res["over_prompts"][ck]["sentipolc"]["score"]["macro_f1"]
        both = [r["sentipolc"][k]["macro_f1"] for k in ("score/0", "score/0#1")]
        assert over["draws"] == 2 and over["mean"] == pytest.approx(sum(both) / 2, abs=1e-3)
        assert over["draw_range"] == pytest.approx(abs(both[0] - both[1]), abs=1e-3)
        assert all(p["raw"] is not None for p in preds if p["protocol"] != "score")
        assert all(0 <= p["p_yes"] <= 1 for p in preds if p["protocol"] == "score")
        assert all(p["parsed"] is not None for p in preds if p["protocol"] == "generate")
        # the official script's inputs give the same figures, empty gold answers included
        d = os.path.join(out, "runs", ck, "squad_it")
        rescored = subprocess.run(
            [sys.executable, "-m", "cerbero_ray.evaluate.squad", f"{d}/gold.json", f"{d}/predictions.json"],
            capture_output=True,
            text=True,
            check=True,
        )
        again = json.loads(rescored.stdout)
        assert again["exact_match"] == pytest.approx(r["squad_it"]["generate/0"]["em"])
        assert again["f1"] == pytest.approx(r["squad_it"]["generate/0"]["f1"])
    pairs = res["paired"]["b - a"]
    assert set(pairs) == {"squad_it", "ami2020", "ironita", "sentipolc"}
    d = pairs["ami2020"]["score/0"]["f1"]
    assert d["ci"][0] <= d["diff"] <= d["ci"][1] and 0 <= d["p_not_better"] <= 1
    md = open(os.path.join(out, "results.md")).read()
    for published in ("cerbero-7b (published)", "Fauno (published)", "Camoscio (published)", "mistral-7b (published)"):
        assert md.count(published) == 3, published  # SQuAD, and beside both F1 tables
    assert "| b | score |" in md and "*always positive*" in md and "Prompt sensitivity" in md and "b - a" in md
    assert "does not say which F1" in md and re.search(r"\d+\.\d\d \[\d+\.\d, \d+\.\d\]", md)
    assert "Differs from the published setting" in md and "## What was scored" in md
    # the shot draws: each draw's shots by id and figure, the mean in the main tables, how far it moved
    assert "## Shot draws" in md and "2 draws of shots" in md
    for d, ids in enumerate(res["tasks"]["sentipolc"]["shots"]):
        assert f"| a | sentipolc | score | {d} | {', '.join(ids)} |" in md
    assert re.search(r"- a, sentipolc, score: macro_f1 moved by \d+\.\d\d points across 2 shot draws", md)
    s0, s1 = (res["results"]["a"]["sentipolc"][k]["macro_f1"] for k in ("score/0", "score/0#1"))
    assert f"{(s0 + s1) / 2:.2f} (draws {min(s0, s1):.1f}–{max(s0, s1):.1f})" in md
    assert os.path.getsize(os.path.join(out, "results.png")) > 1000
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved["results"] == res["results"] and saved["seed"] == 0
    assert set(saved["tasks"]["ami2020"]["prompt_hashes"]) == evalita_units
    # the console's headline: a row per model, the main figure of each task, the path of every table
    from cerbero_ray.evaluate.report import headline

    head = headline(saved, "OUT/results.md").splitlines()
    assert len(head) == 3 + 2 + 1 and head[-1].endswith("OUT/results.md"), head
    assert "squad_it F1 (generate)" in head[1] and "ami2020 macro-F1 (score)" in head[1]
    assert re.match(r"\| b \| \d+\.\d\d \[", head[4]) and head[4].count("[") == 2, head[4]
    assert head[4].count("(draws ") == 2  # IronITA and SENTIPOLC: the mean over two shot draws
    caplog.set_level(logging.INFO, logger="cerbero_ray")
    caplog.clear()
    again = run_evaluate(c)  # every (checkpoint, task) resumes from its metrics.json
    assert "4 task(s) already done, 0 to go" in caplog.text
    assert again["results"] == res["results"] and again["paired"] == res["paired"]
    # another prompt limit is another run: the identity holds it
    c2 = json.loads(json.dumps(c))
    c2["evaluate"]["max_prompt_tokens"] = 2048
    c2["evaluate"]["only"] = ["sentipolc"]
    del c2["evaluate"]["checkpoints"]["b"]  # one model says it (each one more costs ~5 s here)
    caplog.clear()
    run_evaluate(c2)
    assert "a: 0 task(s) already done, 1 to go" in caplog.text


@pytest.fixture(scope="module")
def tiny_gguf(tiny_hf, tmp_path_factory):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed: pip install -e '.[gguf]'")
    from cerbero_ray.export import run_export

    out = str(tmp_path_factory.mktemp("gguf"))
    x = {"checkpoint": tiny_hf, "output_dir": out, "name": "tiny", "types": ["f32"], "threads": 2}
    res = run_export({"paths": PATHS, "export": {**x, "overwrite": False, "verify": False, "base": None, "lora": True}})
    return res["files"]["f32"]["path"]


def _small(out, models: dict, data, *extra):
    over = [
        f"paths.output_dir={out}",
        "~evaluate.checkpoints.tiny-cpu",
        *[f"+evaluate.checkpoints.{k}={v}" for k, v in models.items()],
        f"evaluate.tasks.squad_it.path={SAMPLES}/squad_it_sample.json",
        "evaluate.tasks.squad_it.max_rows=6",
        "evaluate.tasks.squad_it.max_new_tokens=8",
        "evaluate.tasks.squad_it.prompts=[0]",
        f"evaluate.tasks.ami2020.path={data}/ami2020.tsv",
        "evaluate.tasks.ami2020.pool_rows=10",
        "evaluate.tasks.ami2020.max_rows=10",
        "evaluate.tasks.ami2020.max_new_tokens=4",
        "evaluate.tasks.ami2020.prompts=[0]",
        "evaluate.tasks.ami2020.shot_draws=1",  # the backends, not the draws, are under test here
        "evaluate.tasks.ami2020.protocols=[generate,choice,score,benchita]",
        "evaluate.only=[squad_it,ami2020]",
        "evaluate.bootstrap=100",
        *extra,
    ]
    return to_container(compose("evaluate", over))


@pytest.fixture(scope="module")
def hf_runs(tmp_path_factory, tiny_hf, evalita_dir, ray_local):
    """The HF checkpoint's evaluation under ``_small``, once for the module (~9 s a model here): each
    test that sets a GGUF file, an adapter or an endpoint beside it copies it into its own output
    folder with :func:`_with_hf`, and the job resumes it (same identity) instead of running again."""
    out = tmp_path_factory.mktemp("hf_eval")
    run_evaluate(_small(out, {"hf": tiny_hf}, evalita_dir))
    return out / "evaluate" / "runs" / "hf"


def _with_hf(tmp_path, hf_runs, tiny_hf, other: dict, data):
    """``_small`` for "hf" (done already: :func:`hf_runs`, its figures read back as they are) and ``other``."""
    shutil.copytree(hf_runs, tmp_path / "evaluate" / "runs" / "hf")
    res = run_evaluate(_small(tmp_path, {"hf": tiny_hf, **other}, data))
    assert all(
        json.load(open(hf_runs / t / "metrics.json"))["units"] == res["results"]["hf"][t] for t in res["results"]["hf"]
    )
    return res


def test_a_gguf_file_is_evaluated_like_its_checkpoint(tmp_path, tiny_hf, hf_runs, tiny_gguf, evalita_dir):
    """llama.cpp (in a child process) on the f32 GGUF of the same model: the same greedy answers and
    nearly the same yes/no probabilities, under every protocol."""
    res = _with_hf(tmp_path, hf_runs, tiny_hf, {"gguf": tiny_gguf}, evalita_dir)
    assert res["model_kinds"] == {"hf": "hf", "gguf": "gguf"}
    out = os.path.join(tmp_path, "evaluate", "runs")
    for task in ("squad_it", "ami2020"):
        hf = pq.read_table(os.path.join(out, "hf", task, "predictions.parquet")).to_pylist()
        gg = pq.read_table(os.path.join(out, "gguf", task, "predictions.parquet")).to_pylist()
        assert [(r["id"], r["protocol"]) for r in hf] == [(r["id"], r["protocol"]) for r in gg]
        same = [a["raw"] == b["raw"] for a, b in zip(hf, gg) if a["raw"] is not None]
        assert sum(same) >= 0.9 * len(same), (task, sum(same), len(same))
        for a, b in zip(hf, gg):
            if a["p_yes"] is not None:
                assert abs(a["p_yes"] - b["p_yes"]) < 0.02
    # the choice protocol: llguidance on the HF weights, a GBNF grammar in llama.cpp; every answer
    # is exactly si or no (nothing unparsed), and the two agree
    for m in ("hf", "gguf"):
        rows = pq.read_table(os.path.join(out, m, "ami2020", "predictions.parquet")).to_pylist()
        choice = [r for r in rows if r["protocol"] == "choice"]
        assert len(choice) == 10 and {r["raw"] for r in choice} <= {"si", "no"} and all(r["parsed"] for r in choice)
        assert res["results"][m]["ami2020"]["choice/0"]["unparsed"] == 0


def test_an_adapter_is_evaluated_on_its_recorded_base(tmp_path, tiny_hf, hf_runs, tiny_adapters, evalita_dir):
    """A LoRA adapter folder as a checkpoint (the main job's with train.method=lora): loaded on the
    base its record names (tests/test_lora.py checks that against peft), every protocol runs, and
    its yes/no probabilities differ from the base's."""
    a = tiny_adapters["sentiment-it"]
    res = _with_hf(tmp_path, hf_runs, tiny_hf, {"adapter": a}, evalita_dir)  # the base: "hf"
    assert res["model_kinds"] == {"hf": "hf", "adapter": "hf"}
    out = os.path.join(tmp_path, "evaluate", "runs")
    preds = {
        m: {(r["id"], r["protocol"]): r for r in pq.read_table(f"{out}/{m}/ami2020/predictions.parquet").to_pylist()}
        for m in ("hf", "adapter")
    }
    assert preds["hf"].keys() == preds["adapter"].keys()
    assert any(preds["hf"][k]["p_yes"] != preds["adapter"][k]["p_yes"] for k in preds["hf"] if k[1].startswith("score"))


def test_an_openai_compatible_endpoint_is_evaluated(tmp_path, tiny_hf, hf_runs, evalita_dir):
    """Our own server as the endpoint: the generating protocols through /v1/chat/completions give
    the HF checkpoint's greedy answers, and score through /v1/label (the unit's task sent inline)
    gives its yes/no probabilities."""
    from ray import serve

    from cerbero_ray.serve.service import run_serve
    from conftest import free_port

    url = run_serve(
        to_container(
            compose(
                "serve",
                [f"serve.checkpoint={tiny_hf}", f"serve.port={free_port()}", "serve.cpus_per_replica=0.5"],
            )
        )
    )
    try:
        res = _with_hf(tmp_path, hf_runs, tiny_hf, {"api": f"{url}/v1"}, evalita_dir)
    finally:
        serve.shutdown()
    assert res["model_kinds"]["api"] == "endpoint"
    assert set(res["results"]["api"]["ami2020"]) == {"generate/0", "choice/0", "score/0", "benchita/0"}
    out = os.path.join(tmp_path, "evaluate", "runs")
    m = json.load(open(os.path.join(out, "api", "ami2020", "metrics.json")))
    assert not m.get("unsupported")
    for task in ("squad_it", "ami2020"):
        hf = {(r["id"], r["protocol"]): r for r in pq.read_table(f"{out}/hf/{task}/predictions.parquet").to_pylist()}
        api = pq.read_table(f"{out}/api/{task}/predictions.parquet").to_pylist()
        assert {(r["id"], r["protocol"]) for r in api} == set(hf)
        same = [hf[(r["id"], r["protocol"])]["raw"] == r["raw"] for r in api if r["raw"] is not None]
        assert sum(same) >= 0.9 * len(same), (task, sum(same), len(same))
        scored = [(hf[(r["id"], r["protocol"])]["p_yes"], r["p_yes"]) for r in api if r["protocol"].startswith("score")]
        assert len(scored) == (10 if task == "ami2020" else 0)
        assert all(abs(a - b) < 1e-4 for a, b in scored), scored


def test_an_endpoint_that_cannot_score_runs_the_rest(tmp_path, evalita_dir, ray_local, monkeypatch):
    """An OpenAI-compatible endpoint without /v1/label (as vLLM's or llama.cpp's server): asked
    once, score is refused in one line and ``unsupported`` in the results; generate and benchita run.
    A row the endpoint answers 400 (a prompt over its window) is counted as an error, the rest go on.
    A request it cannot take at first (a 503 with Retry-After, a dropped connection) is sent again:
    no error, the answer it then gives."""
    import http.server
    import threading
    import zlib

    from cerbero_ray.evaluate import backends

    monkeypatch.setattr(backends, "RETRY_WAITS", (0.01,) * 6)
    seen, tried = [], set()

    class OpenAIOnly(http.server.BaseHTTPRequestHandler):
        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            seen.append(("GET", self.path))
            self._send(200, {"object": "list", "data": [{"id": "other", "object": "model"}]})

        def do_POST(self):
            seen.append(("POST", self.path))
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path != "/v1/chat/completions":
                return self._send(404, {"detail": "Not Found"})
            if zlib.crc32(body) % 5 == 0:  # some rows, the same ones on every run
                seen.append(("400", self.path))
                return self._send(400, {"error": {"message": "the prompt exceeds the context window"}})
            if zlib.crc32(body) % 5 in (1, 2) and body not in tried:  # others: busy at the first try
                tried.add(body)
                seen.append(("busy", self.path))
                if zlib.crc32(body) % 5 == 1:
                    self.close_connection = True  # dropped: no answer at all
                    return
                self.send_response(503)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                return self.end_headers()
            self._send(200, {"choices": [{"message": {"role": "assistant", "content": "no"}}]})

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), OpenAIOnly)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        res = run_evaluate(_small(tmp_path, {"other": f"http://127.0.0.1:{srv.server_port}/v1"}, evalita_dir))
    finally:
        srv.shutdown()
    assert set(res["results"]["other"]["ami2020"]) == {"generate/0", "choice/0", "benchita/0"}
    m = json.load(open(os.path.join(tmp_path, "evaluate", "runs", "other", "ami2020", "metrics.json")))
    assert "/v1/label" in m["unsupported"]["score/0"] and "log-probability" in m["unsupported"]["score/0"]
    assert [p for p in seen if p[1] == "/v1/label"] == [("POST", "/v1/label")]  # asked once
    assert [p for p in seen if p[0] == "GET"] == [("GET", "/v1/models")]  # which model: asked once too
    errors = sum(u["errors"] for t in res["results"]["other"].values() for u in t.values())
    assert errors == seen.count(("400", "/v1/chat/completions")) > 0
    busy = seen.count(("busy", "/v1/chat/completions"))
    assert busy == len(tried) > 1  # each once, then answered
    runs = os.path.join(tmp_path, "evaluate", "runs", "other")
    rows = [r for t in ("squad_it", "ami2020") for r in pq.read_table(f"{runs}/{t}/predictions.parquet").to_pylist()]
    assert sum(r["raw"] == "no" for r in rows) == len(rows) - errors


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


@contextlib.contextmanager
def chat_endpoint(answer):
    """An OpenAI-style endpoint on loopback for the evaluation's requests: ``/v1/models`` names
    one model, ``/v1/chat/completions`` is ``answer(body) -> (status, json)``, any other route a
    404 (no ``/v1/label``: ``score`` is unsupported there). Yields its ``…/v1`` URL."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, code, body):
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            self._send(200, {"data": [{"id": "m"}]})

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            self._send(*answer(body)) if self.path == "/v1/chat/completions" else self._send(404, {})

        def log_message(self, *a):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{srv.server_port}/v1"
    finally:
        srv.shutdown()


NO = (200, {"choices": [{"message": {"role": "assistant", "content": "no"}}]})


def test_a_model_that_fails_keeps_the_tasks_it_finished(tmp_path, evalita_dir, ray_local, monkeypatch):
    """Each task is written as soon as its last answer is in: an endpoint that fails on the second
    task stops the job in one line with the first task's figures kept, and the same command then
    asks only for the second."""
    import threading

    from cerbero_ray.evaluate import backends

    monkeypatch.setattr(backends, "RETRY_WAITS", (0.0,) * 6)
    healthy, asked = threading.Event(), []

    def answer(body):
        squad_row = body["max_tokens"] in (8, 100)  # _small's SQuAD-it units (ami2020's: 4, 10)
        asked.append(squad_row)
        if not squad_row and not healthy.is_set():  # down once the SQuAD-it rows are answered
            return 500, {"error": {"message": "out of memory"}}
        return NO

    runs = tmp_path / "evaluate" / "runs" / "api"
    with chat_endpoint(answer) as api:
        cfg = _small(tmp_path, {"api": api}, evalita_dir, "evaluate.batch_rows=4")
        with pytest.raises(backends.EndpointError, match=r"/v1/chat/completions: 500 Internal Server Error"):
            run_evaluate(cfg)
        assert (runs / "squad_it" / "metrics.json").exists() and not (runs / "ami2020").exists()
        squad_asked = asked.count(True)
        healthy.set()
        asked.clear()
        res = run_evaluate(cfg)
    assert asked and not any(asked)  # the second run asked for ami2020's rows only
    assert list(res["results"]["api"]) == ["squad_it", "ami2020"] and squad_asked > 0


def test_figures_go_into_the_training_run_that_made_the_checkpoint(tmp_path, tiny_hf, evalita_dir, ray_local):
    """``evaluate.tracker.kind=mlflow``: a checkpoint that a tracked training run wrote (``<run>/hf``)
    gets its figures in that run, at the run's step, its status and parameters left as they are; an
    endpoint gets a run of its own; each gets the report as files; the same command again sends
    nothing."""

    from mlflow.tracking import MlflowClient

    from cerbero_ray.config.common import TrackerConfig
    from cerbero_ray.evaluate.report import tracked_figures
    from cerbero_ray.tracking import open_run

    uri = f"file:{tmp_path}/mlruns"
    run = tmp_path / "train" / "run1"
    shutil.copytree(tiny_hf, run / "hf")
    training = TrackerConfig(kind="mlflow", project="training", uri=uri)
    rec = open_run(training, "train.tracker", "run1", str(run), {"train.lr": 0.1})
    (run / "summary.json").write_text(json.dumps({"steps": 7}))

    tracked = ["evaluate.tracker.kind=mlflow", f"evaluate.tracker.uri={uri}"]
    with chat_endpoint(lambda body: NO) as api:
        cfg = _small(tmp_path, {"trained": str(run / "hf"), "api": api}, evalita_dir, *tracked)
        res = run_evaluate(cfg)
        client = MlflowClient(tracking_uri=uri)
        own = json.load(open(tmp_path / "evaluate" / "runs" / "api" / "tracker.json"))["run_id"]
        runs = {"trained": (rec["run_id"], 7), "api": (own, 0)}

        def figures(m):
            run_id, step = runs[m]
            units = res["results"][m].items()
            want = {f"eval/{t}/{k}": v for t, u in units for k, v in tracked_figures(u).items()}
            got = client.get_run(run_id).data.metrics
            assert {k: got.get(k) for k in want} == want
            return {k: [(x.step, x.value) for x in client.get_metric_history(run_id, k)] for k in want}

        trained, asked = figures("trained"), figures("api")
        some = {"eval/squad_it/generate/f1", "eval/ami2020/score/macro_f1", "eval/ami2020/choice/accuracy"}
        assert some <= set(trained)
        assert "eval/squad_it/generate/f1" in asked and not any("/score/" in k for k in asked)
        assert all(len(h) == 1 and h[0][0] == 7 for h in trained.values())
        assert all(len(h) == 1 and h[0][0] == 0 for h in asked.values())
        t = client.get_run(rec["run_id"])  # the training run: its status and parameters as they were
        assert t.info.status == "RUNNING" and t.data.params == {"train.lr": "0.1"}
        a = client.get_run(own)
        assert a.info.run_name == "api" and a.data.params["checkpoint"] == api and a.info.status == "FINISHED"
        assert client.get_experiment(a.info.experiment_id).name == "cerbero-ray"  # evaluate.tracker.project
        for run_id in (rec["run_id"], own):  # the report, as files of each run
            assert [f.path for f in client.list_artifacts(run_id, "evaluation")] == [
                "evaluation/results.md",
                "evaluation/results.png",
            ]
        md = open(client.download_artifacts(own, "evaluation/results.md", str(tmp_path))).read()
        assert md == (tmp_path / "evaluate" / "results.md").read_text()
        run_evaluate(cfg)  # every task done already: nothing sent again
        assert figures("trained") == trained and figures("api") == asked
