"""Evaluation throughput on CPU, ratios measured in one process on the same rows and checkpoint:

1. EVALITA, our ``score`` protocol (the label scorer: ``si``/``no`` scored in one forward pass per
   row, the shared 5-shot prefix once) vs the authors' ``generate`` protocol (greedy answer, at most
   32 tokens, stopping at a newline, then mapped to the nearest label): rows/s ratio (goal >= 4x);
2. SQuAD-it answers (3-shot prompts, greedy, 32 tokens) through the continuous-batching engine vs
   transformers ``generate`` in batches of the same size on the same prompts (goal >= 1.5x).

    python bench/bench_evaluate.py                          # tiny random model; EVALITA from ../shared/data
    python bench/bench_evaluate.py --checkpoint outputs/quality/train/sentipolc/hf --rows 200

A random tiny model never stops early, so generation spends its whole 32-token budget; a model that
answers "si" and a newline stops after 2-3 tokens and narrows ratio 1. Writes bench/results/evaluate-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    import torch
    from bench_label import timed  # the same median-of-reps timer

    from cerbero_ray.chat import STOP_STRING
    from cerbero_ray.config.evaluate import EvalTaskConfig, EvaluateConfig
    from cerbero_ray.evaluate.backends import ModelRun
    from cerbero_ray.evaluate.worker import EvalWorker
    from cerbero_ray.inference.generator import Generator
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.models import load_for_inference, tiny
    from cerbero_ray.tokenizer import build_tokenizer, save_tokenizer

    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=None, help="an HF folder; default: the tiny random model")
    p.add_argument("--rows", type=int, default=200, help="EVALITA rows (sentipolc test)")
    p.add_argument("--data-dir", default=os.environ.get("CERBERO_DATA_DIR", os.path.join(REPO, "..", "shared", "data")))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--draws", type=int, default=3, help="shot draws per protocol (the evaluation default)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"), help="where the JSON goes")
    p.add_argument("--cpu-smoke", action="store_true", help="8 rows, one repetition: checks the script runs")
    a = p.parse_args()
    if a.cpu_smoke:
        a.rows, a.reps = 8, 1
    torch.set_num_threads(os.cpu_count())
    ckpt = a.checkpoint
    if ckpt is None:
        ckpt = tempfile.mkdtemp(prefix="bench-eval-")
        tiny().save_pretrained(ckpt)
        save_tokenizer(build_tokenizer(), ckpt)
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "checkpoint": a.checkpoint or "tiny random-init Mistral",
        "reps": a.reps,
    }

    # 1. EVALITA: score vs generate, the same rows and prompts (the first wording)
    import pyarrow as pa

    from cerbero_ray.evaluate.reading import read_unit
    from cerbero_ray.evaluate.tasks import prepare

    senti = os.path.join(a.data_dir, "evalita", "sentipolc.csv")
    tc = {
        "kind": "sentipolc",
        "path": senti,
        "shots": 5,
        "max_rows": a.rows,
        "pool_rows": 100,
        "protocols": ["generate", "score"],
        "prompts": [0],
        "max_new_tokens": 32,
        "shot_draws": a.draws,
    }
    p_ev = prepare("sentipolc", EvalTaskConfig(**tc), seed=0)
    gen_units = [u for u in p_ev.units if u.protocol == "generate"]
    score_units = [u for u in p_ev.units if u.protocol == "score"]
    ec = EvaluateConfig(output_dir=a.out, batch_size=a.batch)  # the schema's engine settings otherwise
    w = EvalWorker(ModelRun.of(ec, ckpt, 32, {f"sentipolc/{u.key}": u.task for u in score_units}))

    def requests(unit):
        return pa.Table.from_pylist(
            [
                {
                    "task": "sentipolc",
                    "unit": unit.key,
                    "id": r["id"],
                    "messages": r.get("messages"),
                    "text": r.get("text"),
                    "max_new_tokens": unit.max_new_tokens,
                    "stop_at_newline": unit.stop_at_newline,
                }
                for r in unit.requests
            ]
        )

    def answers(unit, out):
        return {
            i: {"raw": r, "p_yes": p, "truncated": t}
            for i, r, p, t in zip(out["id"], out["raw"], out["p_yes"], out["truncated"])
        }

    def every(units):  # every draw's requests in one table, as the job sends them
        return pa.concat_tables([requests(u) for u in units])

    w(requests(score_units[0]).slice(0, 8)), w(requests(gen_units[0]).slice(0, 4))  # warm-up
    t_score, scored = timed(lambda: w(every(score_units)), a.reps)
    t_gen, gen = timed(lambda: w(every(gen_units)), a.reps)
    n = len(score_units[0].requests)
    agree = []
    for d, (su, gu) in enumerate(zip(score_units, gen_units)):  # per draw: do the two protocols agree
        part = lambda out, d=d: {k: v[d * n : (d + 1) * n] for k, v in out.items()}  # noqa: E731
        s_rows = read_unit(p_ev, su, answers(su, part(scored)))[0]
        g_rows = read_unit(p_ev, gu, answers(gu, part(gen)))[0]
        agree.append(sum(x["pred_class"] == y["pred_class"] for x, y in zip(s_rows, g_rows)) / n)
    agree = sum(agree) / len(agree)
    rows = [r for u in score_units for r in u.requests]
    res["evalita"] = {
        "draws": len(score_units),
        "rows": len(rows),
        "score_rows_per_s": round(len(rows) / t_score, 1),
        "generate_rows_per_s": round(len(rows) / t_gen, 1),
        "ratio": round(t_gen / t_score, 2),
        "protocols_agree": round(agree, 3),
    }

    # 2. SQuAD-it: the continuous engine vs transformers generate, batches of the same size
    sq = prepare(
        "squad_it",
        EvalTaskConfig(
            kind="squad",
            path=os.path.join(REPO, "data", "samples", "squad_it_sample.json"),
            shots=3,
            max_rows=None,
            protocols=["generate"],
            prompts=[0],
            max_new_tokens=32,
        ),
        seed=0,
    )
    model, tok = load_for_inference(ckpt, "auto")
    prompts = [
        tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in sq.units[0].requests
    ]
    s = Sampling(max_new_tokens=32, temperature=0.0, stop=[STOP_STRING, "\n"], seed=0)
    hf = Generator(model, tok, batch_size=a.batch, max_prompt_tokens=4096)
    hf.generate(prompts[:2], s)
    t_hf, out_hf = timed(lambda: hf.generate(prompts, s), a.reps)
    t_cb, out_cb = timed(lambda: w.batcher.generate(prompts, s), a.reps)
    same = sum(x["text"] == y["text"] for x, y in zip(out_hf, out_cb)) / len(prompts)
    res["squad"] = {
        "rows": len(prompts),
        "batch": a.batch,
        "prompt_tokens_mean": round(sum(r["prompt_tokens"] for r in out_cb) / len(out_cb), 1),
        "hf_generate_rows_per_s": round(len(prompts) / t_hf, 2),
        "continuous_rows_per_s": round(len(prompts) / t_cb, 2),
        "ratio": round(t_hf / t_cb, 2),
        "same_text": round(same, 3),
    }
    # 3. EVALITA on a GGUF file of the same model (llama.cpp, one child for the whole run) against
    #    the HF path above: the same rows, score and generate
    from cerbero_ray import llamacpp

    if llamacpp.available():
        from cerbero_ray.evaluate.backends import GGUFRunner
        from cerbero_ray.export import run_export

        gdir = tempfile.mkdtemp(prefix="bench-eval-gguf-")
        x = {"checkpoint": ckpt, "output_dir": gdir, "name": "m", "types": ["f16"], "threads": 0}
        x |= {"overwrite": False, "verify": False, "base": None, "lora": True}
        paths = {"repo_dir": REPO, "data_dir": a.data_dir, "output_dir": gdir}
        gguf = run_export({"paths": paths, "export": x})["files"]["f16"]["path"]
        cfg = ModelRun.of(ec, gguf, 32, {f"sentipolc/{u.key}": u.task for u in score_units[:1]})
        runner = GGUFRunner(gguf, cfg)
        try:
            both = requests(score_units[0]).to_pylist() + requests(gen_units[0]).to_pylist()
            runner.run(both[:4])  # warm-up: the child starts and loads the file
            t_gguf, _ = timed(lambda: runner.run(both), a.reps)
        finally:
            runner.close()
        hf_rate = 2 * len(rows) / (t_score + t_gen)  # both protocols, every draw, on the HF path
        res["evalita_gguf"] = {
            "rows": len(both),
            "gguf_rows_per_s": round(len(both) / t_gguf, 1),
            "hf_rows_per_s": round(hf_rate, 1),
            "hf_over_gguf": round(hf_rate / (len(both) / t_gguf), 2),
        }
    print(json.dumps(res, indent=1))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"evaluate-{res['date']}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
