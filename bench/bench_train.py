"""Training-loop throughput on CPU: our trainer vs a plain single-process PyTorch loop, in one run.

    python bench/bench_train.py                  # ~35M-parameter Mistral, seq 1024, 10 steps each
    python bench/bench_train.py --steps 4 --hidden 64 --layers 2 --seq 256    # a quick check

Same model (random init, same seed), same rows in the same order (the shipped mix sample packed at
--seq), fp32, no gradient checkpointing, global batch --batch rows of --seq tokens:
  plain     one process, torch on every core: HF forward(labels=…), backward, clip, AdamW
  local     ours without Ray (python -m cerbero_ray.train.local): DeepSpeed ZeRO-1, world size 1
  ray_1worker  ours: Ray Train + Ray Data + DeepSpeed ZeRO-1, 1 worker with every core
  ray       ours: Ray Train + Ray Data + DeepSpeed ZeRO-1, 2 workers over gloo, one core each
Reports steady-state tokens/s (median over the steps after --warmup) and the ratios to plain.
Writes bench/results/train-<date>.json.
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

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def overrides(a, out, data_dir, name, workers, cpus=1):
    return [
        f"paths.output_dir={out}",
        f"train.data_dir={data_dir}",
        f"train.name={name}",
        f"train.num_workers={workers}",
        f"train.cpus_per_worker={cpus}",
        f"train.global_batch_size={a.batch}",
        "train.micro_batch_size=1",
        f"train.max_steps={a.steps}",
        "train.epochs=1",
        "train.eval_rows=0",
        "train.checkpoint_every=0",
        "train.log_every=1",
        "train.gradient_checkpointing=false",
        "train.precision=fp32",
        "train.hf_in_checkpoints=false",
        f"+model.overrides.hidden_size={a.hidden}",
        f"+model.overrides.num_hidden_layers={a.layers}",
        f"+model.overrides.intermediate_size={3 * a.hidden}",
        f"+model.overrides.num_attention_heads={a.hidden // 64}",
        "+model.overrides.num_key_value_heads=2",
    ]


def steady(history, warmup):
    speeds = [h["tokens_per_s"] for h in history if "tokens_per_s" in h][warmup:]
    return statistics.median(speeds)


def run_plain(cfg, warmup):
    """The baseline: the same micro-batches, a textbook PyTorch loop."""
    from dataclasses import replace

    import torch

    from cerbero_ray.models import build_model
    from cerbero_ray.train.plan import plan_all, total_steps
    from cerbero_ray.train.reader import local_batches

    cfg, run = cfg
    t = cfg.train
    torch.set_num_threads(os.cpu_count())
    model = build_model(replace(cfg.model, dtype="float32"), seed=t.seed).train()
    model.config._attn_implementation = "sdpa"
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    plan = plan_all(list(run.shards), t, 1)[0]
    batches = local_batches(plan.ranges[0], 1)
    speeds = []
    for _ in range(total_steps([plan], t)):
        t0 = time.perf_counter()
        for _ in range(t.global_batch_size):
            b = {k: torch.as_tensor(v) for k, v in next(batches).items()}
            loss = model(
                input_ids=b["input_ids"], labels=b["labels"], position_ids=b["position_ids"], use_cache=False
            ).loss
            (loss / t.global_batch_size).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        speeds.append(t.global_batch_size * run.seq_len / (time.perf_counter() - t0))
    n = sum(p.numel() for p in model.parameters())
    return statistics.median(speeds[warmup:]), n


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=os.path.join(REPO, ".bench", "train"))
    a = p.parse_args()

    import shutil

    from cerbero_ray.config import check, compose, to_container
    from cerbero_ray.config.common import ClusterConfig
    from cerbero_ray.data.pipeline import run_data
    from cerbero_ray.runtime import init_ray, shutdown_ray
    from cerbero_ray.train import run_train
    from cerbero_ray.train.run_plan import plan_run

    shutil.rmtree(a.out, ignore_errors=True)
    init_ray(ClusterConfig(num_cpus=os.cpu_count() + 1, dashboard=True))  # 1 CPU per worker + 1 for Ray Data reads
    data = to_container(compose("data", ["data=mix_sample", f"data.seq_len={a.seq}", f"paths.output_dir={a.out}"]))
    run_data(data)
    data_dir = data["data"]["output_dir"]
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "args": vars(a),
    }

    plain = check("train", compose("train", overrides(a, a.out, data_dir, "plain", 1)))
    plain_cfg = (plain, plan_run(plain))
    res["plain_tokens_per_s"], res["params"] = run_plain(plain_cfg, a.warmup)
    print(f"plain: {res['plain_tokens_per_s']:.0f} tokens/s ({res['params'] / 1e6:.1f}M parameters)", flush=True)

    cores = os.cpu_count()
    for key, workers in (("ray_1worker", 1), ("ray", 2)):
        t0 = time.perf_counter()
        summary = run_train(
            to_container(compose("train", overrides(a, a.out, data_dir, key, workers, cores // workers)))
        )
        res[f"{key}_wall_s"] = round(time.perf_counter() - t0, 1)
        res[f"{key}_tokens_per_s"] = steady(
            [json.loads(x) for x in open(os.path.join(summary["run_dir"], "metrics.jsonl"))], a.warmup
        )
    shutdown_ray()

    import subprocess

    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "cerbero_ray.train.local", *overrides(a, a.out, data_dir, "local", 1)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())},
    )
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    res["local_wall_s"] = round(time.perf_counter() - t0, 1)
    res["local_tokens_per_s"] = steady(
        [json.loads(x) for x in open(os.path.join(a.out, "train", "local", "metrics.jsonl"))], a.warmup
    )
    for k in ("local", "ray_1worker", "ray"):
        res[f"{k}_vs_plain"] = round(res[f"{k}_tokens_per_s"] / res["plain_tokens_per_s"], 3)
    print(json.dumps(res, indent=1))
    write_results("train", res)


if __name__ == "__main__":
    main()
