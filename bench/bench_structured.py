"""Constrained vs free generation on the same requests (issue 32's speed goal: a JSON-schema
constraint costs at most 10% of throughput at batch 32). The continuous engine, no Ray; each
request greedy, 64 new tokens at most; new tokens per second, median of ``--reps`` runs after a
warm-up of each, the order alternated (free, constrained, constrained, free, …).

    python bench/bench_structured.py                 # CPU: the tiny model
    python bench/bench_structured.py --out $OUT      # GPU: the full Mistral-7B shape (bench/gpu_run.sh structured)
    python bench/bench_structured.py --shape mid     # CPU: 8 layers of hidden 1,024 (~150 M parameters), whose
                                                     # step weighs more against the constraint's fixed cost

Cases: ``free`` (no constraint), ``json_schema`` (an extraction schema: a string, a list of
strings, a boolean, an enum), ``choice`` (three answers), ``regex_text`` (lower-case text, which
seldom ends before the limit), ``free_as_json`` (free text cut at each row's JSON answer's length).
A random model's constrained answers end when the grammar does, so they are shorter and their
prefill weighs more per token: ``regex_text`` against ``free``, and ``json_schema`` against
``free_as_json`` (``vs_free_same_lengths``), are the like-for-like ratios.
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
    p.add_argument("--shape", choices=("tiny", "mid"), default="tiny", help="the CPU model (GPU: the 7B shape)")
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
    if not gpu and a.shape == "mid":
        from transformers import MistralForCausalLM

        from cerbero_ray.models import tiny_config

        torch.manual_seed(0)
        mid = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16)
        model = MistralForCausalLM(tiny_config(**mid, num_key_value_heads=4)).eval()
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

    lengths = {}  # free_as_json: free text cut at each row's JSON answer's length (its own figure's like for like)

    def run(g):
        if g == "free_as_json":
            items = [
                (p, Sampling(max_new_tokens=n, temperature=0.0, stop=())) for p, n in zip(prompts, lengths["json"])
            ]
        else:
            items = [(p, Sampling(max_new_tokens=a.new, temperature=0.0, stop=(), grammar=g)) for p in prompts]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = cb.run(items)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        return sum(r["new_tokens"] for r in out) / dt, out

    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "batch": a.batch, "new": a.new, "reps": a.reps}
    res["params_m"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
    for g in cases.values():  # warm-up: graphs, compilation, grammar caches
        out = run(g)[1]
        if g is cases["json_schema"]:
            lengths["json"] = [o["new_tokens"] for o in out]
    cases["free_as_json"] = "free_as_json"
    run("free_as_json")
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
        if name not in ("free", "free_as_json"):
            r["vs_free"] = round(med / statistics.median(times["free"]), 3)
            r["complete"] = sum(o.get("constraint") == "complete" for o in outs[name])
    # the JSON answers end early (a random model closes the object in ~35-45 tokens): against free
    # text of the very same lengths, prefill weighs alike and the ratio is the constraint's own cost
    res["json_schema"]["vs_free_same_lengths"] = round(
        res["json_schema"]["new_tokens_per_s"] / res["free_as_json"]["new_tokens_per_s"], 3
    )
    valid = 0
    for o in outs["json_schema"]:
        try:
            v = json.loads(o["text"])
            valid += set(v) == set(SCHEMA["required"]) and v["tono"] in SCHEMA["properties"]["tono"]["enum"]
        except ValueError:
            pass
    res["json_schema"]["valid"] = f"{valid}/{a.batch}"
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"bench_structured{'-mid' if a.shape == 'mid' and not gpu else ''}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
