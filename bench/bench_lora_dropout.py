"""What LoRA dropout costs a training step (CPU): the recipe's ``apply_lora`` on a frozen bf16 base
under bf16 autocast, one forward and backward at ``--seq`` tokens, with ``train.lora.dropout`` 0
(the default) and 0.05, the two models alternated, warmed up, medians. With dropout, every adapted
linear draws a mask over its input and keeps the dropped copy for the backward: seven
activation-sized tensors a layer that the frozen base alone never writes.

    python bench/bench_lora_dropout.py              # ~1 minute: 4 layers of hidden 1,024, seq 1,024
    python bench/bench_lora_dropout.py --cpu-smoke  # seconds
    bash bench/gpu_run.sh lora_dropout              # on a GPU: bench_train_gpu.py --method lora at 0.05

Writes bench/results/lora_dropout-<date>.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--reps", type=int, default=6, help="timed steps of each (order alternated)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()

    import torch
    from transformers import MistralForCausalLM

    from cerbero_ray.config.train import LORA_TARGETS, LoraConfig
    from cerbero_ray.models import tiny_config
    from cerbero_ray.train.lora import apply_lora

    layers, seq, reps = (1, 64, 2) if a.cpu_smoke else (a.layers, a.seq, a.reps)
    torch.manual_seed(0)
    shape = dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=layers, num_attention_heads=16)
    base = MistralForCausalLM(tiny_config(**shape, num_key_value_heads=4)).to(torch.bfloat16)
    base.requires_grad_(False)
    rates = (0.0, 0.05)
    models = {
        r: apply_lora(copy.deepcopy(base), LoraConfig(r=16, dropout=r, target_modules=list(LORA_TARGETS)), 0, True)
        for r in rates
    }
    ids = torch.randint(3, base.config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))

    def step(m):
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = m(input_ids=ids).logits
        logits.float().logsumexp(-1).mean().backward()

    for m in models.values():
        step(m)
    times = {r: [] for r in rates}
    for i in range(reps):
        for r in rates if i % 2 == 0 else rates[::-1]:
            t0 = time.perf_counter()
            step(models[r])
            times[r].append(time.perf_counter() - t0)
    med = {r: statistics.median(v) for r, v in times.items()}
    out = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "shape": {**shape, "seq": seq, "lora_r": 16, "targets": 7},
        "reps": reps,
        "step_s": {str(r): round(v, 4) for r, v in med.items()},
        "dropout_0.05_over_0": round(med[0.05] / med[0.0], 3),
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"lora_dropout-{out['date']}.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
