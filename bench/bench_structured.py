"""Constrained vs free generation on the same requests (issue 32's speed goal: a JSON-schema
constraint costs at most 10% of throughput at batch 32). The continuous engine, no Ray; each
request greedy, 64 new tokens at most; new tokens per second, median of ``--reps`` runs after a
warm-up of each, the order alternated (free, constrained, constrained, free, …).

    python bench/bench_structured.py                 # CPU: the tiny model
    python bench/bench_structured.py --out $OUT      # GPU: the full Mistral-7B shape (bench/gpu_run.sh structured)

Cases: ``free`` (no constraint), ``json_schema`` (an extraction schema: a string, a list of
strings, a boolean, an enum), ``choice`` (three answers), ``regex_text`` (lower-case text, which
seldom ends before the limit). A random model's constrained answers end when the grammar does, so
they are shorter and their prefill weighs more per token: ``regex_text`` is the like-for-like one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

SCHEMA = {
    "type": "object",
    "properties": {
        "argomento": {"type": "string", "maxLength": 40},
        "luoghi": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
        "opinione": {"type": "boolean"},
        "tono": {"enum": ["neutro", "positivo", "negativo"]},
    },
    "required": ["argomento", "luoghi", "opinione", "tono"],
    "additionalProperties": False,
}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", RESULTS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()
    if a.cpu_smoke:
        a.batch, a.new, a.reps = 4, 16, 1

    import torch
    from bench_serve_gpu import bench_model

    from cerbero_ray.inference import grammar as G
    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.tokenizer import build_tokenizer

    gpu = torch.cuda.is_available() and not a.cpu_smoke
    model, cuda = bench_model(not gpu)
    tok = build_tokenizer()
    lines = [
        json.loads(x)
        for x in open(os.path.join(os.path.dirname(__file__), "..", "data", "samples", "chat_it_openassistant.jsonl"))
    ]
    questions = [m["content"] for x in lines for m in x.get("messages", [])[:1]][: a.batch]
    questions += ["Di che cosa parla questa domanda?"] * (a.batch - len(questions))
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q[:400]}], tokenize=False, add_generation_prompt=True)
        for q in questions
    ]
    cb = ContinuousBatcher(model, tok, num_slots=a.batch, max_prompt_tokens=512, max_new_tokens=a.new)
    cases = {
        "free": None,
        "json_schema": G.grammar("json_schema", SCHEMA),
        "choice": G.grammar("choice", ["sì", "no", "non so"]),
        # lower-case Italian text: a constraint that rarely ends before the token limit, so its
        # tokens/s against free text is the mask's own cost per token (prefill shared alike)
        "regex_text": G.grammar("regex", r"[a-zàèéìòù ,.]+"),
    }

    def run(g):
        s = Sampling(max_new_tokens=a.new, temperature=0.0, stop=(), grammar=g)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = cb.generate(prompts, s)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return sum(r["new_tokens"] for r in out) / dt, out

    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "batch": a.batch, "new": a.new, "reps": a.reps}
    for g in cases.values():  # warm-up: graphs, compilation, grammar caches
        run(g)
    times = {name: [] for name in cases}
    outs = {}
    for rep in range(a.reps):
        order = list(cases) if rep % 2 == 0 else list(reversed(cases))
        for name in order:
            tps, outs[name] = run(cases[name])
            times[name].append(tps)
    for name in cases:
        med = statistics.median(times[name])
        r = res[name] = {"new_tokens_per_s": round(med, 1), "runs": [round(x, 1) for x in times[name]]}
        r["new_tokens_mean"] = round(sum(o["new_tokens"] for o in outs[name]) / len(outs[name]), 1)
        if name != "free":
            r["vs_free"] = round(med / statistics.median(times["free"]), 3)
            r["complete"] = sum(o.get("constraint") == "complete" for o in outs[name])
    valid = 0
    for o in outs["json_schema"]:
        try:
            v = json.loads(o["text"])
            valid += set(v) == set(SCHEMA["required"]) and v["tono"] in SCHEMA["properties"]["tono"]["enum"]
        except ValueError:
            pass
    res["json_schema"]["valid"] = f"{valid}/{a.batch}"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_structured.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
