"""Prefill: the continuous engine's packed prefill (``SlotModel.prefill``: the prompts one
token after another, no padding) against transformers' own prefill (one left-padded forward with
an attention mask and the last position's logits, what ``generate`` runs first), on the same
prompts in one process, alternated, warmed up, medians.

    python bench/bench_prefill.py                  # ~2 minutes: the tiny model and the mid shape
    python bench/bench_prefill.py --cpu-smoke      # seconds: checks the script runs
    bash bench/gpu_run.sh prefill                  # on a GPU: the full Mistral-7B shape, bf16, random weights

Cases (16 prompts each, random token ids, seeded):
  similar   1,300-1,500 tokens (SQuAD-it's 3-shot prompts: little padding to save)
  varied    50-1,500 tokens (chat traffic: padding is most of a padded batch)
Models: ``tiny`` (4.2 M parameters: attention is most of the work) and ``mid`` (8 layers of hidden
1,024, ~175 M: the projections and the MLP are; its prompts a quarter as long, to stay in minutes);
on a GPU ``7b`` (bench_serve_gpu's model) at full length. Reports prompt tokens/s each way, the ratio, and
the largest difference of the last logits. Writes bench/results/prefill-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {"similar": (1300, 1500), "varied": (50, 1500)}


def build(shape: str):
    import torch
    from transformers import MistralForCausalLM

    from cerbero_ray.models import tiny, tiny_config

    torch.manual_seed(0)
    if shape == "7b":
        from bench_serve_gpu import bench_model

        return bench_model(False)[0]
    if shape == "tiny":
        return tiny().eval()
    mid = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=8, num_attention_heads=16)
    return MistralForCausalLM(tiny_config(**mid, num_key_value_heads=4)).eval()


def hf_prefill(model, prompts):
    """transformers' prefill: left-padded, masked, positions from the mask, the last logits."""
    import torch

    width = max(len(p) for p in prompts)
    dev = next(model.parameters()).device
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    with torch.no_grad():
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0),
            logits_to_keep=1,
            use_cache=True,
        )
    return out.logits[:, -1].float()


def measure(model, prompts, max_len: int, reps: int, cuda: bool) -> tuple[dict, float]:
    """(median seconds per prefill of ours and of transformers', the largest difference of their
    last logits), ``reps`` pairs with the order alternated after a warm-up of each."""
    import torch

    from cerbero_ray.inference.slots import SlotModel

    slots = SlotModel(model, num_slots=len(prompts), max_len=max_len)
    runs = {"ours": lambda: slots.prefill(prompts, list(range(len(prompts)))), "hf": lambda: hf_prefill(model, prompts)}
    diff = float((runs["ours"]() - runs["hf"]()).abs().max())  # also the warm-up
    times = {"ours": [], "hf": []}
    for r in range(reps):
        for name in ("ours", "hf") if r % 2 == 0 else ("hf", "ours"):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            runs[name]()
            if cuda:
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, diff


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="tiny,mid")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--reps", type=int, default=5, help="timed pairs (order alternated); the median counts")
    p.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    p.add_argument("--cpu-smoke", action="store_true", help="tiny model, 4 short prompts, one pair")
    a = p.parse_args()

    import torch

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    shapes = ["tiny"] if a.cpu_smoke else ["7b"] if cuda else a.shapes.split(",")
    rows, reps = (4, 1) if a.cpu_smoke else (a.rows, a.reps)
    out = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "rows": rows,
        "reps": reps,
    }
    for shape in shapes:
        model = build(shape)
        vocab = model.config.vocab_size
        for case, (lo, hi) in CASES.items():
            g = torch.Generator().manual_seed(0)
            lo, hi = (8, 40) if a.cpu_smoke else (lo // 4, hi // 4) if shape == "mid" else (lo, hi)
            lens = torch.randint(lo, hi + 1, (rows,), generator=g).tolist()
            prompts = [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lens]
            med, diff = measure(model, prompts, hi + 1, reps, cuda)
            tokens = sum(lens)
            res = {
                "prompt_tokens": tokens,
                "padded_tokens": rows * max(lens),
                "ours_tokens_per_s": round(tokens / med["ours"]),
                "hf_tokens_per_s": round(tokens / med["hf"]),
                "ratio": round(med["hf"] / med["ours"], 2),
                "max_logit_diff": diff,
            }
            out[f"{shape}/{case}"] = res
            print(f"{shape}/{case}: {res}", flush=True)
            # fp32 on the CPU: equal; bf16 on the GPU: recorded (another summation order; the gpu
            # tests hold the engine to transformers' text)
            assert cuda or diff < 1e-2, f"the packed prefill's logits differ from transformers' by {diff}"
            if cuda:
                torch.cuda.empty_cache()
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"prefill-{out['date']}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
