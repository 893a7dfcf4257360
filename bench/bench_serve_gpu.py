"""One-GPU benchmark of the server's generation engines beside ../shared/bench/gpu_generate_check.py
(run it in the same call): a full Mistral-7B-shaped random model in bf16, batch 32, 256-token
prompts, 64 new tokens each, greedy, no stop string. No Ray.

    python ../shared/bench/gpu_generate_check.py --out $OUT; python bench/bench_serve_gpu.py --out $OUT
    python bench/bench_serve_gpu.py --cpu-smoke          # tiny sizes on CPU: checks the script runs

  hf                serve.engine=hf: cerbero_ray.inference.generator.Generator (transformers generate)
  continuous        serve.engine=continuous with cuda_graphs=false: our loop, eager decoding
  continuous_graphs serve.engine=continuous, the GPU default: CUDA-graph-captured decoding
All 32 requests are submitted at once, as token ids (exactly --prompt tokens each). Reports new
tokens/s (median of --reps after a warm-up that also captures the graphs), the greedy texts'
agreement with `hf`, and, when the baseline's JSON is in --out, each ratio to its default
`generate` figure (goal >= 3x for the server's default engine).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def run_batcher(cb, ids, s) -> list[dict]:
    done = [queue.Queue() for _ in ids]
    for x, q in zip(ids, done):
        cb.submit(x, s, lambda item, q=q: q.put(item) if isinstance(item, dict) else None)
    return [q.get() for q in done]


def timed(fn, reps, cuda):
    import torch

    fn()  # warm-up (and graph capture)
    times = []
    for _ in range(reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # git-ignored


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", RESULTS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()
    if a.cpu_smoke:
        a.batch, a.prompt, a.new, a.reps = 4, 32, 8, 2

    import torch
    from transformers import MistralForCausalLM

    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.generator import Generator
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.models import mistral_7b_config, tiny_config
    from cerbero_ray.tokenizer import build_tokenizer

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    torch.manual_seed(0)
    with torch.device(dev):
        model = MistralForCausalLM(tiny_config() if a.cpu_smoke else mistral_7b_config()).to(dtype).eval()
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 31000, (a.batch, a.prompt), generator=g).tolist()
    s = Sampling(max_new_tokens=a.new, temperature=0.0, stop=(), seed=0)
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "args": vars(a)}

    gen = Generator(model, tok, batch_size=a.batch, max_prompt_tokens=a.prompt)
    prompts = [tok.decode(x) for x in ids]  # Generator takes text; its retokenized prompts differ slightly
    out, t = timed(lambda: gen.generate(prompts, s), a.reps, cuda)
    res["hf"] = {
        "new_tokens": sum(r["new_tokens"] for r in out),
        "s": round(t, 3),
        "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in out), 1),
    }
    texts = {}
    for name, graphs in (("continuous", False), ("continuous_graphs", True)):
        if graphs and not cuda:
            res[name] = "skipped: CUDA graphs need a GPU"
            continue
        cb = ContinuousBatcher(
            model, tok, num_slots=a.batch, max_prompt_tokens=a.prompt, max_new_tokens=a.new, cuda_graphs=graphs
        )
        out, t = timed(lambda cb=cb: run_batcher(cb, ids, s), a.reps, cuda)
        texts[name] = [r["text"] for r in out]
        res[name] = {
            "new_tokens": sum(r["new_tokens"] for r in out),
            "s": round(t, 3),
            "steps": cb.steps,
            "graph_error": cb.slots.graph_error,
            "kv_cache_gib": round(cb.slots.cache_bytes() / 2**30, 2),
        }
        del cb
    if "continuous_graphs" in texts:
        same = sum(x == y for x, y in zip(texts["continuous"], texts["continuous_graphs"]))
        res["graphs_same_text_as_eager"] = f"{same}/{a.batch}"
    base = os.path.join(a.out, "gpu_generate_check.json")
    default = None
    if os.path.exists(base):
        b = json.load(open(base))
        default = b.get("dynamic") if isinstance(b.get("dynamic"), dict) else None  # its default-generate run
    for name in ("hf", "continuous", "continuous_graphs"):
        if isinstance(res.get(name), dict):
            r = res[name]
            r["new_tokens_per_s"] = round(r["new_tokens"] / r["s"], 1)
            r["vs_hf_here"] = round(r["new_tokens_per_s"] / (res["hf"]["new_tokens"] / res["hf"]["s"]), 3)
            if default and default.get("new_tokens_per_s"):
                r["vs_baseline_default_generate"] = round(r["new_tokens_per_s"] / default["new_tokens_per_s"], 3)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_serve_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
