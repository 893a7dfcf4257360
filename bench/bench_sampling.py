"""What each sampling setting costs the continuous engine (CPU or GPU, no Ray): 32 requests decoded
together, 32 new tokens each, under each setting in turn, alternating the order over repetitions
after a warm-up of every setting; medians.

    python bench/bench_sampling.py               # tiny model on this machine's CPU (~1 minute)
    python bench/bench_sampling.py --reps 5

Settings: greedy; nucleus sampling (temperature 0.7, top-p 0.9); greedy and sampled under the
penalties (frequency 0.5, presence 0.3, repetition 1.2); greedy under a logit bias of 16 tokens.
Reports new tokens/s per setting and its ratio to greedy. To compare two versions of the code, run
it once per checkout (``PYTHONPATH=<other checkout> python bench/bench_sampling.py``), alternating.
Writes bench/results/sampling-<date>.json.
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
from _results import write_results  # noqa: E402 (bench/, the script's own folder)


def settings():
    from dataclasses import replace

    from cerbero_ray.inference.sampling import Sampling

    greedy = Sampling(max_new_tokens=32, temperature=0.0, stop=())
    sampled = replace(greedy, temperature=0.7, top_p=0.9, seed=1)
    pen = dict(frequency_penalty=0.5, presence_penalty=0.3, repetition_penalty=1.2)
    return {
        "greedy": greedy,
        "sampled": sampled,
        "greedy_penalties": replace(greedy, **pen),
        "sampled_penalties": replace(sampled, **pen),
        "greedy_logit_bias": replace(greedy, logit_bias={t: -5.0 for t in range(1000, 1016)}),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slots", type=int, default=32)
    a = ap.parse_args()

    import torch

    import cerbero_ray
    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.models import tiny
    from cerbero_ray.tokenizer import build_tokenizer

    tok = build_tokenizer()
    cuda = torch.cuda.is_available()
    model = tiny().eval().to("cuda" if cuda else "cpu")
    cb = ContinuousBatcher(model, tok, num_slots=a.slots, max_prompt_tokens=128, max_new_tokens=64)
    asks = [[{"role": "user", "content": f"Domanda {i}: perché il cielo è blu?"}] for i in range(a.slots)]
    prompts = [tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True) for m in asks]
    cases = settings()
    for s in cases.values():  # warm-up: every setting once
        cb.generate(prompts, s)
    runs: dict[str, list[float]] = {k: [] for k in cases}
    for rep in range(a.reps):
        for name in list(cases) if rep % 2 == 0 else list(reversed(cases)):
            t0 = time.perf_counter()
            out = cb.generate(prompts, cases[name])
            runs[name].append(sum(r["new_tokens"] for r in out) / (time.perf_counter() - t0))
    cb.close()
    med = {k: statistics.median(v) for k, v in runs.items()}
    gpu = f", {torch.cuda.get_device_name(0)}" if cuda else ""
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores" + gpu,
        "torch": torch.__version__,
        "code": os.path.dirname(cerbero_ray.__file__),
        "slots": a.slots,
        "new_tokens_per_s": {k: round(v) for k, v in med.items()},
        "vs_greedy": {k: round(v / med["greedy"], 3) for k, v in med.items()},
        "every_run": {k: [round(x) for x in v] for k, v in runs.items()},
    }
    print(json.dumps(res, indent=1))
    write_results("sampling", res)


if __name__ == "__main__":
    main()
