"""Where one decode step's time goes (issue 30): the continuous engine's captured step with the
plain HF-module path against the fast step (fused QKV and gate/up, compiled regions, varlen
attention), on the full Mistral-7B shape in bf16, batch ``--batch`` at ``--prompt`` tokens. No Ray.

    python bench/probe_decode_gpu.py --out $OUT        # on the GPU machine (bench/gpu_run.sh probe)
    python bench/probe_decode_gpu.py --cpu-smoke       # here: tiny model, checks the script runs

Per path (``plain``: ``fast_decode=false``; ``fast``: the GPU default), in ms per step, medians of
20 after 3:

  graph_replay   the captured greedy step alone (what the GPU spends on a step; CUDA only)
  eager          the same step uncaptured (kernel launches from Python)
  engine_step    the whole ContinuousBatcher (bench_serve_gpu.step_ms): the step, sampling, the
                 host's work on the previous step's tokens, detokenizing, emitting

and the top kernels of an eager plain step by GPU time (torch.profiler), with the kernel count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def median_ms(fn, cuda: bool, reps: int = 20, warm: int = 3) -> float:
    import torch

    times = []
    for i in range(warm + reps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        if i >= warm:
            times.append(time.perf_counter() - t0)
    return round(1000 * statistics.median(times), 3)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", RESULTS))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()
    if a.cpu_smoke:
        a.batch, a.prompt = 4, 32

    import torch
    from bench_serve_gpu import bench_model, step_ms

    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.slots import SlotModel
    from cerbero_ray.tokenizer import build_tokenizer

    model, cuda = bench_model(a.cpu_smoke)
    tk = build_tokenizer()
    b = a.batch
    ids = torch.randint(1000, 31000, (b, a.prompt)).tolist()
    res = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__, "args": vars(a)}
    logits = {}
    for name, fast in (("plain", False), ("fast", True)):
        r = res[name] = {}
        slots = SlotModel(model, b, a.prompt + 64, fast=fast)
        first = slots.prefill(ids, list(range(b))).argmax(-1)
        slots.start(list(range(b)), first, [a.prompt] * b)
        state = [slots.cur_ids.clone(), slots.cur_pos.clone()]

        def reset(slots=slots, state=state):
            slots.cur_ids.copy_(state[0])
            slots.cur_pos.copy_(state[1])

        def eager(slots=slots, reset=reset):
            reset()
            return slots.run(b, a.prompt + 1, False, graphs=False)

        r["eager"] = median_ms(eager, cuda)
        logits[name] = eager()[1].clone()
        if cuda:
            slots.run(b, a.prompt + 1, False, graphs=True)
            g = next(iter(slots.step_graphs.values()))[0]
            r["graph_replay"] = median_ms(lambda g=g, reset=reset: (reset(), g.replay()), cuda)
        r.update(attention=slots.attention, attention_note=slots.attention_note, compiled=slots.compiled)
        r.update(compile_error=slots.compile_error, graph_error=slots.graph_error, graphs=len(slots.step_graphs))
        make = lambda max_prompt, fast=fast: ContinuousBatcher(
            model,
            tk,
            num_slots=b,
            max_prompt_tokens=max_prompt,
            max_new_tokens=64,
            fast_decode=fast,
            graph_batch_sizes=(),  # every step here is at full occupancy: the one graph the probe times
        )
        r["engine_step"] = round(step_ms(make, ids, 64 if cuda else 8, 3, cuda)[0], 3)
        del slots
    diff = (logits["fast"] - logits["plain"]).abs().max()
    res["fast_vs_plain"] = {
        "max_abs_logit_diff": round(float(diff), 4),
        "argmax_equal": f"{int((logits['fast'].argmax(-1) == logits['plain'].argmax(-1)).sum())}/{b}",
    }
    # the profile of an eager plain step: which kernels, how many
    slots = SlotModel(model, b, a.prompt + 64, fast=False)
    slots.prefill(ids, list(range(b)))
    tok, pos = torch.randint(1000, 31000, (b,)), torch.full((b,), a.prompt)
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            slots.decode(tok, pos)
        if cuda:
            torch.cuda.synchronize()
    key = "device_time_total" if cuda else "cpu_time_total"
    avg = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    if cuda:
        res["kernels_per_plain_step"] = sum(e.device_type == torch.autograd.DeviceType.CUDA for e in prof.events()) // 3
    res["top_plain"] = [
        {"name": e.key[:90], "ms_per_step": round(getattr(e, key, 0) / 3000, 3), "count_per_step": e.count // 3}
        for e in avg[:12]
    ]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "probe_decode_gpu.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1), flush=True)


if __name__ == "__main__":
    main()
