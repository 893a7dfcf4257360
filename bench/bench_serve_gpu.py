"""One-GPU benchmark of the server's generation path beside ../shared/bench/gpu_generate_check.py
(run it in the same call): a full Mistral-7B-shaped random model in bf16, batch 32, 256-token
prompts, 64 new tokens each (no stop string, so every row generates all 64), through
cerbero_ray.generate.engine.Generator, the code a serving replica batches requests into. No Ray.

    python ../shared/bench/gpu_generate_check.py --out $OUT; python bench/bench_serve_gpu.py --out $OUT
    python bench/bench_serve_gpu.py --cpu-smoke          # tiny sizes on CPU: checks the script runs

Reports new tokens/s (median of --reps after a warm-up) and, when the baseline's JSON is in --out,
the ratio to its default `generate` figure (goal >= 3x).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", "."))
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

    from cerbero_ray.generate.engine import Generator, Sampling
    from cerbero_ray.models import mistral_7b_config, tiny_config
    from cerbero_ray.tokenizer import build_tokenizer

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    with torch.device(dev):
        model = MistralForCausalLM(tiny_config() if a.cpu_smoke else mistral_7b_config()).to(dtype).eval()
    tok = build_tokenizer()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 31000, (a.batch, a.prompt), generator=g).tolist()
    prompts = [tok.decode(x) for x in ids]
    gen = Generator(model, tok, batch_size=a.batch, max_prompt_tokens=a.prompt)
    s = Sampling(max_new_tokens=a.new, temperature=0.0, stop=(), seed=0)
    gen.generate(prompts, s)  # warm-up
    times = []
    for _ in range(a.reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = gen.generate(prompts, s)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    new = sum(r["new_tokens"] for r in out)
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "args": vars(a),
           "new_tokens": new, "new_tokens_per_s": round(new / statistics.median(times), 1),
           "prompt_tokens_mean": round(statistics.mean(r["prompt_tokens"] for r in out), 1)}
    base = os.path.join(a.out, "gpu_generate_check.json")
    if os.path.exists(base):
        b = json.load(open(base))
        default = b.get("dynamic") if isinstance(b.get("dynamic"), dict) else None  # its default-generate run
        if default and default.get("new_tokens_per_s"):
            res["vs_default_generate"] = round(res["new_tokens_per_s"] / default["new_tokens_per_s"], 3)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "bench_serve_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
