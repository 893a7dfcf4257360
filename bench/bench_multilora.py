"""Many LoRA adapters in one continuous batch, against the same requests served one adapter at a
time, and against the base model alone: throughput and latency as ratios measured in one run.

For k = 1, 4, 16 adapters (rank 16 on every attention and MLP projection), the same N greedy
requests (request i asks adapter i mod k) arrive at once and are served three ways by the
continuous-batching engine (:mod:`cerbero_ray.inference.continuous`, 16 slots):

- ``base``: the base model with no adapters loaded (the reference throughput);
- ``mixed``: every adapter loaded, all requests in one stream: rows of different adapters share
  each decode step through the gathered per-row A/B (:mod:`cerbero_ray.inference.multilora`);
- ``one_at_a_time``: every adapter loaded, but the requests of one adapter are served, then the
  next adapter's (what a server that batches one adapter at a time does); latency counts from
  the moment all requests arrived.

Reports per k: generated tokens/s of each (medians of ``--reps`` repetitions in alternating order,
after a warm-up of each variant on the full request set; every repetition is kept), mixed / base
(also per repetition) and mixed / one-at-a-time throughput, and mean and p90 latency ratios. The
goal: mixed >= 0.9 x base throughput at k = 16 (median of 3 or more alternating runs). Adapters are
written as peft folders directly (no peft needed: the GPU image lacks it).

    python bench/bench_multilora.py                       # CPU: a 4-layer, hidden-512 model
    python bench/bench_multilora.py --shape 7b --out $OUT # GPU: 4 layers of Mistral-7B's shape
    python bench/bench_multilora.py --cpu-smoke           # tiny sizes: checks the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SHAPES = {
    "smoke": dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2),
    "cpu": dict(hidden_size=512, intermediate_size=1536, num_attention_heads=8, num_key_value_heads=4),
    "2k": dict(hidden_size=2048, intermediate_size=7168, num_attention_heads=16, num_key_value_heads=4),
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8),
}


def write_adapter(model, folder: str, r: int, seed: int) -> None:
    """A peft-format LoRA folder for ``model`` with random A and B (as trained adapters are)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, mod in model.named_modules():
        if name.rsplit(".", 1)[-1] in TARGETS:
            a = torch.randn(r, mod.in_features, generator=g) / mod.in_features**0.5
            b = torch.randn(mod.out_features, r, generator=g) * 0.02
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(TARGETS), "bias": "none"}
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)


def serve(engine, requests: list[tuple[list[int], int]], sampling, groups: bool) -> dict:
    """Submit ``requests`` ((ids, adapter)) at once (``groups``: one adapter's after another's);
    returns tokens/s and per-request latencies from the common arrival time."""
    done: dict[int, float] = {}
    tokens = [0]
    cv = threading.Condition()

    def finished(i):
        def emit(item):
            if isinstance(item, dict):
                with cv:
                    done[i] = time.perf_counter()
                    tokens[0] += item.get("new_tokens", 0)
                    cv.notify_all()

        return emit

    t0 = time.perf_counter()
    order = sorted(range(len(requests)), key=lambda i: requests[i][1]) if groups else range(len(requests))
    batches = []
    for i in order:
        if groups and batches and requests[batches[-1][-1]][1] == requests[i][1]:
            batches[-1].append(i)
        elif groups:
            batches.append([i])
    for batch in batches if groups else [list(order)]:
        for i in batch:
            engine.submit(requests[i][0], sampling, finished(i), adapter=requests[i][1])
        with cv:
            cv.wait_for(lambda b=batch: all(i in done for i in b), timeout=3600)
    wall = time.perf_counter() - t0
    lat = sorted(done[i] - t0 for i in range(len(requests)))
    return {
        "tokens_per_s": tokens[0] / wall,
        "wall_s": wall,
        "latency_mean_s": statistics.mean(lat),
        "latency_p90_s": lat[int(0.9 * (len(lat) - 1))],
    }


def measure(runs: dict, reps: int) -> dict[str, list[dict]]:
    """Each of ``runs`` (name -> a function returning a result) once to warm up, then ``reps`` times
    in alternating order (as given, then reversed): {name: its results}. Which runs first, caches,
    clocks and allocator growth then weigh on every variant alike."""
    for fn in runs.values():
        fn()
    out: dict[str, list[dict]] = {n: [] for n in runs}
    names = list(runs)
    for rep in range(reps):
        for n in names if rep % 2 == 0 else names[::-1]:
            out[n].append(runs[n]())
    return out


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # git-ignored


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", RESULTS))
    p.add_argument("--shape", choices=tuple(SHAPES), default=None)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--slots", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--ks", default="1,4,16")
    p.add_argument("--kernel", choices=("auto", "gather"), default="auto", help="the decode step's LoRA form")
    p.add_argument("--reps", type=int, default=3, help="repetitions of each variant, in alternating order")
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()
    import torch

    cuda = torch.cuda.is_available()
    shape = a.shape or ("smoke" if a.cpu_smoke else "7b" if cuda else "cpu")
    if a.cpu_smoke:
        a.requests, a.new_tokens, a.ks, a.layers, a.reps = 8, 4, "1,4", 2, 2

    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.multilora import AdapterSet
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.models import tiny
    from cerbero_ray.tokenizer import build_tokenizer

    tok = build_tokenizer()
    dtype = "bfloat16" if cuda else "float32"
    device = "cuda" if cuda else "cpu"

    def model():
        return tiny(dtype=dtype, overrides={**SHAPES[shape], "num_hidden_layers": a.layers}, seed=0).to(device).eval()

    g = torch.Generator().manual_seed(0)
    prompts = [
        torch.randint(3, 32000, (int(n),), generator=g).tolist()
        for n in torch.randint(32, 96, (a.requests,), generator=g)
    ]
    sampling = Sampling(max_new_tokens=a.new_tokens, temperature=0.0, stop=[])
    # one CUDA graph of every slot (no batch buckets): the comparison is mixed against base at the same
    # occupancy, and each variant's compiled regions then compile once, not three times (the call's budget)
    kw = dict(num_slots=a.slots, max_prompt_tokens=128, max_new_tokens=a.new_tokens, graph_batch_sizes=())
    ks = [int(k) for k in a.ks.split(",")]
    work = tempfile.mkdtemp(prefix="cerbero-multilora-")
    ref = model()
    folders = {f"a{i}": os.path.join(work, f"a{i}") for i in range(max(ks))}
    for i, f in enumerate(folders.values()):
        write_adapter(ref, f, a.rank, i)

    base_engine = ContinuousBatcher(model(), tok, **kw)
    res = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "args": vars(a),
        "shape": {**SHAPES[shape], "layers": a.layers},
        "method": f"per k: each variant warmed up on the full request set, then {a.reps} repetitions in "
        "alternating order (base, mixed, one at a time; then reversed), medians",
        "k": {},
    }
    for k in ks:
        m = model()
        aset = AdapterSet(m, dict(list(folders.items())[:k]))
        aset.kernel = a.kernel
        eng = ContinuousBatcher(m, tok, adapters=aset, **kw)
        reqs = [(x, 1 + i % k) for i, x in enumerate(prompts)]
        runs = measure(
            {
                "base": lambda: serve(base_engine, [(x, 0) for x in prompts], sampling, False),
                "mixed": lambda eng=eng, reqs=reqs: serve(eng, reqs, sampling, False),
                "one_at_a_time": lambda eng=eng, reqs=reqs: serve(eng, reqs, sampling, True),
            },
            a.reps,
        )
        med = {n: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for n, rs in runs.items()}
        base, mixed, one = med["base"], med["mixed"], med["one_at_a_time"]
        res["k"][k] = {
            **med,
            "runs": runs,
            "mixed_vs_base_tokens_per_s": round(mixed["tokens_per_s"] / base["tokens_per_s"], 3),
            # the same ratio per repetition (each pair ran side by side): its spread says how much to trust it
            "mixed_vs_base_per_rep": [
                round(x["tokens_per_s"] / y["tokens_per_s"], 3) for x, y in zip(runs["mixed"], runs["base"])
            ],
            "mixed_vs_one_at_a_time_tokens_per_s": round(mixed["tokens_per_s"] / one["tokens_per_s"], 3),
            "mixed_vs_one_at_a_time_latency_mean": round(mixed["latency_mean_s"] / one["latency_mean_s"], 3),
            "mixed_vs_one_at_a_time_latency_p90": round(mixed["latency_p90_s"] / one["latency_p90_s"], 3),
        }
        r = res["k"][k]
        r["fast_decode"] = {"base": base_engine.slots.fast, "adapters": eng.slots.fast}
        print(
            f"k={k:2d}: mixed {mixed['tokens_per_s']:.0f} tok/s ({r['mixed_vs_base_tokens_per_s']:.2f}x base "
            f"{base['tokens_per_s']:.0f}; per repetition {r['mixed_vs_base_per_rep']}), one adapter at a time "
            f"{one['tokens_per_s']:.0f} tok/s (mixed {r['mixed_vs_one_at_a_time_tokens_per_s']:.2f}x); mean "
            f"latency mixed/one-at-a-time {r['mixed_vs_one_at_a_time_latency_mean']:.2f}, "
            f"p90 {r['mixed_vs_one_at_a_time_latency_p90']:.2f}",
            flush=True,
        )
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"bench_multilora{'-gather' if a.kernel == 'gather' else ''}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
