"""GGUF generation: llama.cpp decoding many prompts together (``generate_many(slots=N)``: a KV
stream per slot, continuous batching) against one prompt at a time (``slots=1``: llama-cpp-python's
``generate``, the path the GGUF evaluation ran before), on the same prompts in one llama.cpp child,
warmed up, order alternated, medians; the tokens must be equal.

    python bench/bench_gguf_generate.py              # ~5 minutes on 2 cores: the tiny model and the mid shape
    python bench/bench_gguf_generate.py --cpu-smoke  # seconds: checks the script runs

Prompts as the EVALITA generate protocol builds them: 32 prompts, one set of few-shot examples
(a shared prefix of ``--prefix`` tokens) and a text of their own each (20-60 tokens), 16 new tokens
greedy. Models (random weights, Q4_K_M as the recipe exports): ``tiny`` (4.2 M parameters: per-call
overhead and attention dominate) and ``mid`` (8 layers of hidden 1,024, ~175 M: reading the weights
does, as in a 7B on a CPU). Writes bench/results/gguf-generate-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPES = {
    "tiny": {},
    "mid": dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16),
}


def export(shape: str, out: str) -> str:
    """A random-init model of ``shape`` with the real tokenizer, exported to Q4_K_M as the recipe does."""
    from cerbero_ray.export import run_export
    from cerbero_ray.models import tiny
    from cerbero_ray.tokenizer import build_tokenizer, save_tokenizer

    hf = os.path.join(out, f"{shape}-hf")
    kv = {"num_key_value_heads": 4} if shape == "mid" else {}
    tiny(overrides={**SHAPES[shape], **kv}).save_pretrained(hf)
    save_tokenizer(build_tokenizer(), hf)
    paths = {"repo_dir": REPO, "data_dir": os.path.join(REPO, "..", "shared", "data"), "output_dir": out}
    spec = {"checkpoint": hf, "output_dir": os.path.join(out, shape), "name": shape, "types": ["q4_k_m"]}
    res = run_export({"paths": paths, "export": {**spec, "threads": 0, "verify": False, "lora": False}})
    return res["files"]["q4_k_m"]["path"]


def prompts(n: int, prefix: int, seed: int = 0) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    shots = [1] + [rng.randrange(100, 32000) for _ in range(prefix - 1)]
    return [shots + [rng.randrange(100, 32000) for _ in range(rng.randint(20, 60))] for _ in range(n)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="tiny,mid")
    p.add_argument("--slots", default="8,16")
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--prefix", type=int, default=400, help="the shared few-shot prefix, tokens")
    p.add_argument("--new", type=int, default=16, help="new tokens a prompt (greedy, no stop string)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds (order alternated); the median counts")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 4 short prompts, one round")
    a = p.parse_args()

    import llama_cpp

    from cerbero_ray import llamacpp

    shapes = ["tiny"] if a.cpu_smoke else a.shapes.split(",")
    slots = [int(s) for s in a.slots.split(",")]
    rows, prefix, new, reps = (4, 30, 4, 1) if a.cpu_smoke else (a.rows, a.prefix, a.new, a.reps)
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "llama_cpp_python": llama_cpp.__version__,
        "rows": rows,
        "prefix": prefix,
        "new_tokens": new,
        "reps": reps,
    }
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp, llamacpp.Session() as s:
        for shape in shapes:
            path = export(shape, tmp)
            ps = prompts(rows, prefix)
            runs = {n: [] for n in [1, *slots]}
            tokens = {}
            order = [list(runs)] + [list(runs) if r % 2 == 0 else list(runs)[::-1] for r in range(reps)]
            for r, names in enumerate(order):  # round 0 warms up: the model loads, the caches fill
                for n in names:
                    t = time.perf_counter()
                    got = s.call("generate_many", path=path, prompts=ps, max_tokens=new, stop=[], slots=n)
                    tokens[n] = got["tokens"]
                    if r:
                        runs[n].append(time.perf_counter() - t)
            med = {n: statistics.median(v) for n, v in runs.items()}
            new_total = sum(map(len, tokens[1]))
            res = {
                "new_tokens_per_s": {str(n): round(new_total / m, 1) for n, m in med.items()},
                "vs_one_at_a_time": {str(n): round(med[1] / m, 2) for n, m in med.items() if n != 1},
                "equal_rows": {str(n): sum(x == y for x, y in zip(tokens[n], tokens[1])) for n in slots},
                "seconds": {str(n): [round(x, 3) for x in v] for n, v in runs.items()},
            }
            out[shape] = res
            print(f"{shape}: {res}", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"gguf-generate-{out['date']}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
