"""LoRA under ZeRO-1 or plain data parallel (DeepSpeed stage 0): which to run, measured in one call.

    python bench/bench_lora_zero.py                       # CPU: 2 ranks over gloo, ~35M-parameter base
    python bench/bench_lora_zero.py --hidden 64 --layers 2 --seq 256 --steps 4 --repeats 1   # a quick check
    python bench/bench_lora_zero.py --nproc 8 --hidden 4096 --layers 32 --seq 8192 --device   # 8 GPUs

The same LoRA run (same base, seed, rows and order; the trainer without Ray, ``torchrun -m
cerbero_ray.train.local``) with ``deepspeed.stage=0`` and ``=1``, alternated ``--repeats`` times so
that a busy machine slows both alike. Reports each run's steady-state tokens/s (median after
``--warmup`` steps), the ratio stage 0 / stage 1 (median over the pairs), rank 0's peak memory,
and the bytes of the last checkpoint's DeepSpeed state. ZeRO-1 shards the optimizer
state of the trainable parameters only: with an adapter (~1% of the base) there is little to shard,
and the partitioned step and all-gather are what it costs. Writes bench/results/lora-zero-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _results import write_results  # noqa: E402 (bench/, the script's own folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def overrides(a, out: str, data_dir: str, name: str, stage: int) -> list[str]:
    return [
        f"paths.output_dir={out}",
        f"train.data_dir={data_dir}",
        f"train.name={name}",
        f"train.num_workers={a.nproc}",
        f"train.global_batch_size={a.batch}",
        "train.micro_batch_size=1",
        f"train.max_steps={a.steps}",
        "train.epochs=1",
        "train.eval_rows=0",
        f"train.checkpoint_every={a.steps}",
        "train.log_every=1",
        "train.method=lora",
        f"train.lora.r={a.r}",
        f"deepspeed.stage={stage}",
        f"train.use_gpu={str(a.device).lower()}",
        *(["train.precision=fp32", "train.gradient_checkpointing=false"] if not a.device else []),
        f"+model.overrides.hidden_size={a.hidden}",
        f"+model.overrides.num_hidden_layers={a.layers}",
        f"+model.overrides.intermediate_size={a.hidden * 7 // 2}",
        f"+model.overrides.num_attention_heads={max(a.hidden // 128, 1)}",
        f"+model.overrides.num_key_value_heads={max(a.hidden // 512, 1)}",
    ]


def checkpoint_bytes(run_dir: str) -> int:
    """All ranks' files of the newest checkpoint's DeepSpeed state: weights held by the engine (the
    adapter) and the optimizer state (stage 0: once, in rank 0's file; ZeRO-1: one shard per rank)."""
    ck = sorted(d for d in os.listdir(run_dir) if d.startswith("checkpoint_step_"))[-1]
    states = os.path.join(run_dir, ck, "ds", "state")
    return sum(os.path.getsize(os.path.join(states, f)) for f in os.listdir(states))


def run(a, out: str, data_dir: str, name: str, stage: int) -> dict:
    shutil.rmtree(os.path.join(out, "train", name), ignore_errors=True)
    threads = max((os.cpu_count() or 2) // a.nproc, 1)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={a.nproc}",
        "--master-port=29611",
        "-m",
        "cerbero_ray.train.local",
        *overrides(a, out, data_dir, name, stage),
    ]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode:
        raise RuntimeError(f"stage {stage}: exit {r.returncode}\n{r.stderr[-4000:]}")
    run_dir = os.path.join(out, "train", name)
    hist = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]
    speeds = [h["tokens_per_s"] for h in hist if "tokens_per_s" in h][a.warmup :]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    return {
        "stage": stage,
        "tokens_per_s": statistics.median(speeds),
        "wall_s": round(time.perf_counter() - t0, 1),
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "checkpoint_bytes": checkpoint_bytes(run_dir),
        "trainable_params": summary.get("trainable_params"),
        "final_loss": next((h["loss"] for h in reversed(hist) if "loss" in h), None),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", action="store_true", help="one GPU per rank (NCCL, bf16)")
    p.add_argument("--data-dir", default=None, help="a data-stage output; default: the mix sample packed at --seq")
    p.add_argument("--out", default=os.path.join(REPO, ".bench", "lora_zero"))
    a = p.parse_args()

    data_dir = a.data_dir
    if data_dir is None:  # the shipped mix sample, packed once by the data stage (Ray Data, then shut down)
        from cerbero_ray.config import compose, to_container
        from cerbero_ray.config.common import ClusterConfig
        from cerbero_ray.data.pipeline import run_data
        from cerbero_ray.runtime import init_ray, shutdown_ray

        shutil.rmtree(a.out, ignore_errors=True)
        init_ray(ClusterConfig(num_cpus=os.cpu_count(), dashboard=False))
        data = to_container(compose("data", ["data=mix_sample", f"data.seq_len={a.seq}", f"paths.output_dir={a.out}"]))
        run_data(data)
        shutdown_ray()
        data_dir = data["data"]["output_dir"]

    runs = []
    for i in range(a.repeats):
        for stage in (0, 1) if i % 2 == 0 else (1, 0):  # alternate the order: drift hits both alike
            res = run(a, a.out, data_dir, f"s{stage}-{i}", stage)
            runs.append(res)
            print(f"stage {stage}, repeat {i}: {res['tokens_per_s']:.0f} tokens/s", flush=True)
    pairs = [
        next(r for r in runs[2 * i : 2 * i + 2] if r["stage"] == 0)["tokens_per_s"]
        / next(r for r in runs[2 * i : 2 * i + 2] if r["stage"] == 1)["tokens_per_s"]
        for i in range(a.repeats)
    ]
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, " + ("GPUs" if a.device else "no GPU"),
        "args": vars(a),
        "runs": runs,
        "stage0_vs_stage1": round(statistics.median(pairs), 3),
        "pairs": [round(x, 3) for x in pairs],
        "same_loss": len({round(r["final_loss"], 4) for r in runs}) == 1,
    }
    print(json.dumps(res, indent=1))
    write_results("lora-zero", res)


if __name__ == "__main__":
    main()
