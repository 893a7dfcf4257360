"""One-GPU benchmark of our training loop beside ../shared/bench/gpu_zero1_check.py (run it in the same
call): the Ray-free loop (cerbero_ray.train.loop with LocalEnv, no Ray needed) on the same 4-layer
Mistral-7B-shaped model (hidden 4096, FFN 14336, 32 heads / 8 KV heads, vocab 32000) at seq 8192,
8 documents per row (document-masked attention), gradient checkpointing, DeepSpeed ZeRO-1 bf16.

    python ../shared/bench/gpu_zero1_check.py --out $OUT && python bench/bench_train_gpu.py --out $OUT
    python bench/bench_train_gpu.py --cpu-smoke          # tiny sizes on CPU: checks the script runs
    # what fp32 gradient accumulation costs (ours) against DeepSpeed's default (the model's bf16):
    python bench/bench_train_gpu.py --accum 4 --steps 5 --warmup 2 --grad-accum-dtype fp32 --out $OUT
    python bench/bench_train_gpu.py --accum 4 --steps 5 --warmup 2 --grad-accum-dtype bf16 --out $OUT
    # LoRA (r 16 on every projection, the base frozen in bf16) against the full fine-tune, same model:
    python bench/bench_train_gpu.py --out $OUT && python bench/bench_train_gpu.py --method lora --out $OUT
    # Liger Kernel's Triton kernels (train.kernels=liger) against the plain modules, same batches:
    python bench/bench_train_gpu.py --out $OUT && python bench/bench_train_gpu.py --kernels liger --out $OUT
    # packed documents' attention: flex_attention (auto on CUDA) against SDPA with the block-diagonal mask:
    python bench/bench_train_gpu.py --out $OUT && python bench/bench_train_gpu.py --attention sdpa --out $OUT
    # a whole Mistral-7B shape (32 layers) on one GPU: the torch strategy's 16 bytes a parameter fit an
    # H200 where DeepSpeed's 20 do not (its run ends in an out-of-memory record); LoRA on DeepSpeed:
    python bench/bench_train_gpu.py --layers 32 --steps 4 --warmup 1 --strategy torch --out $OUT
    python bench/bench_train_gpu.py --layers 32 --steps 4 --warmup 1 --method lora --out $OUT
    # train.strategy=torch (fp32 weights under bf16 autocast, DDP + ZeroRedundancyOptimizer) against DeepSpeed:
    python bench/bench_train_gpu.py --out $OUT && python bench/bench_train_gpu.py --strategy torch --out $OUT

Rows are synthetic (random tokens, 8 documents per row, labels on every token as in the baseline),
written as a shard in the data stage's format and read back through the planned reader. Reports
the loop's steady-state tokens/s (median after --warmup steps) and MFU (the baseline's formula:
6 × params + 6 × layers × hidden × seq FLOPs per token, 989 TFLOP/s peak), and the ratios to the
baseline's ds_zero1 and amp_fp32 when its JSON is in --out. Needs torch, transformers, deepspeed,
pyarrow, numpy (no Ray, no Hydra, no tokenizer).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import statistics
import sys
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def write_shard(path: str, rows: int, seq: int, docs: int, vocab: int) -> None:
    g = np.random.default_rng(0)
    ids = g.integers(3, vocab, (rows, seq), dtype=np.int32)
    pos = np.empty_like(ids)
    for r in range(rows):
        cuts = np.sort(g.choice(np.arange(1, seq), docs - 1, replace=False))
        bounds = [0, *cuts.tolist(), seq]
        pos[r] = np.concatenate([np.arange(bounds[i + 1] - bounds[i]) for i in range(docs)])
    col = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), seq)
    pq.write_table(
        pa.table({"input_ids": col(ids), "labels": col(ids), "position_ids": col(pos)}), path, row_group_size=4
    )


def config(a, shard: str, rows: int, run_dir: str):
    hidden, heads, ffn = (64, 4, 192) if a.cpu_smoke else (4096, 32, 14336)
    model = {
        "_target_": "cerbero_ray.models.mistral_7b",
        "path": None,
        "dtype": "bfloat16",
        "overrides": {
            "num_hidden_layers": a.layers,
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_attention_heads": heads,
            "num_key_value_heads": min(8, heads),
            "sliding_window": None,
        },
    }
    from dataclasses import asdict

    from cerbero_ray.config.common import ModelConfig
    from cerbero_ray.config.train import DeepSpeedConfig, LoraConfig, TrainConfig, TrainStageConfig

    train = {  # the schema's defaults (every key the loop reads), then this bench's settings
        **asdict(TrainConfig()),
        "name": "gpu-bench",
        "data_dir": os.path.dirname(shard),
        "output_dir": os.path.dirname(run_dir),
        "micro_batch_size": 1,
        "global_batch_size": a.accum,
        "epochs": 1,
        "max_steps": a.steps,
        "lr": 1e-5,
        "min_lr_ratio": 0.1,
        "schedule": "cosine",
        "warmup_steps": 0,
        "warmup_ratio": 0.0,
        "weight_decay": 0.0,
        "betas": [0.9, 0.95],
        "eps": 1e-8,
        "max_grad_norm": 1.0,
        "gradient_checkpointing": True,
        "attention": "sdpa" if a.cpu_smoke else a.attention,
        "loss_chunk_tokens": a.loss_chunk,
        "seed": 0,
        "eval_rows": 0,
        "eval_every": 0,
        "log_every": 1,
        "checkpoint_every": 0,
        "keep_checkpoints": 1,
        "hf_in_checkpoints": False,
        "peak_tflops": None,
        "read_cpus": 0.25,
        "fail_at_step": None,
        "fail_rank": 1,
        "precision": "fp32" if a.cpu_smoke else "bf16",
        "method": a.method,
        "compile": a.compile,
        "strategy": a.strategy,
        "kernels": a.kernels,
        "lora": {
            "r": 16,
            "alpha": 32.0,
            "dropout": LoraConfig.dropout if a.lora_dropout is None else a.lora_dropout,
            "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            "train_in_full": [],
            "merge": False,
            "qlora": False,
        },
    }
    ds = {
        "stage": 1,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": 500_000_000,
        "allgather_bucket_size": 500_000_000,
        # fp32: ours (engine.deepspeed_config); bf16: DeepSpeed's default, which follows the model dtype
        "extra": {}
        if a.grad_accum_dtype == "fp32"
        else {"data_types": {"grad_accum_dtype": "bf16"}, "communication_data_type": "bf16"},
    }
    if a.offload:  # the fp32 masters and AdamW's moments in host memory, stepped there by torch's AdamW
        # (DeepSpeed's own CPU Adam is a C++ op the carried pure-Python wheel does not build)
        ds["extra"] = {
            **ds["extra"],
            "zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": not a.cpu_smoke}},
            "zero_force_ds_cpu_optimizer": False,
        }
    return TrainStageConfig(  # the tokenizer: the default (Mistral's), written with the final HF folder
        model=ModelConfig(**model),
        deepspeed=DeepSpeedConfig(**ds),
        train=TrainConfig(**{**train, "lora": LoraConfig(**train["lora"])}),
    )


RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")  # git-ignored


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.environ.get("OUT", RESULTS))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=8192)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--loss-chunk", type=int, default=4096)
    p.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--grad-accum-dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--method", choices=("full", "lora"), default="full")
    p.add_argument("--lora-dropout", type=float, default=None, help="train.lora.dropout (default: the config's)")
    p.add_argument("--compile", choices=("none", "layers"), default="none", help="train.compile")
    p.add_argument("--strategy", choices=("deepspeed", "torch"), default="deepspeed", help="train.strategy")
    p.add_argument("--kernels", choices=("none", "liger"), default="none", help="train.kernels")
    p.add_argument("--attention", choices=("auto", "flex_attention", "sdpa"), default="auto", help="train.attention")
    p.add_argument("--offload", action="store_true", help="DeepSpeed's offload_optimizer to the CPU (a whole 7B)")
    p.add_argument("--save", action="store_true", help="write the final checkpoint and model too (off: steps only)")
    p.add_argument("--cpu-smoke", action="store_true")
    a = p.parse_args()
    if a.cpu_smoke:
        a.seq, a.steps, a.warmup, a.layers = 256, 4, 1, 2

    import torch

    from cerbero_ray.train.env import LocalEnv
    from cerbero_ray.train.loop import train_loop

    work = tempfile.mkdtemp(prefix="cerbero-gpu-bench-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)  # a call runs several of these on one disk
    shard = os.path.join(work, "shard.parquet")
    write_shard(shard, a.steps * a.accum, a.seq, 8, 32000)
    from cerbero_ray.train.run_plan import RunPlan

    rows = a.steps * a.accum
    cfg = config(a, shard, rows, os.path.join(work, "run"))
    plan = RunPlan(os.path.join(work, "run"), a.seq, rows, ({"path": shard, "rows": rows},))
    env = LocalEnv(plan.run_dir)
    name = "bench_train_gpu" + (f"-accum{a.accum}-{a.grad_accum_dtype}" if a.accum > 1 else "")
    name += "-lora" if a.method == "lora" else ""
    name += f"-dropout{a.lora_dropout:g}" if a.method == "lora" and a.lora_dropout is not None else ""
    name += f"-compile-{a.compile}" if a.compile != "none" else ""
    name += "-torch" if a.strategy == "torch" else ""
    name += f"-{a.kernels}" if a.kernels != "none" else ""
    name += f"-L{a.layers}" if a.layers != 4 and not a.cpu_smoke else ""
    name += f"-{a.attention}" if a.attention != "auto" else ""
    name += "-offload" if a.offload else ""
    if not a.save:  # the steps are timed, not the checkpoint: its 16-20 bytes a parameter are 18 GB for the
        # 4-layer model and ~116 GB for a whole 7B, more than a GPU machine's 64 GB disk holds (and a call's
        # six runs would leave six of them); metrics.jsonl and the summary are still written. patch.object
        # fails at once if the loop's methods are renamed, rather than letting the checkpoint back in
        from unittest import mock

        from cerbero_ray.train import loop as loop_mod

        mock.patch.object(loop_mod._Run, "save", lambda self, at: None).start()
        mock.patch.object(loop_mod._Run, "write_model", lambda self, folder, card=None: folder).start()
    try:
        summary = train_loop(cfg, plan, env)
    except torch.cuda.OutOfMemoryError as e:  # a figure too: what does not fit one GPU (a whole 7B's masters)
        res = {
            "device": torch.cuda.get_device_name(0),
            "args": vars(a),
            "error": f"out of memory: {str(e).splitlines()[0][:300]}",
            "max_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1),
        }
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, f"{name}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(json.dumps(res), flush=True)
        sys.exit(3)
    env.close()
    hist = [json.loads(x) for x in open(os.path.join(plan.run_dir, "metrics.jsonl"))]
    steady = [h for h in hist if "tokens_per_s" in h][a.warmup :]
    res = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch": torch.__version__,
        "args": vars(a),
        "tokens_per_s": round(statistics.median(h["tokens_per_s"] for h in steady)),
        "mfu": statistics.median(h["mfu"] for h in steady) if steady[0]["mfu"] is not None else None,
        "final_loss": summary.get("final_loss"),
        "method": a.method,
        "trainable_params": summary.get("trainable_params"),
        "total_params": summary.get("total_params"),
        "peak_memory_bytes": summary.get("peak_memory_bytes"),
        "compile": a.compile,
        "strategy": a.strategy,
        "kernels": a.kernels,
        "attention": a.attention,
        "first_step_s": round(hist[0]["step_s"], 2),  # with --compile layers: the compilation's time
    }
    if torch.cuda.is_available():
        res["max_mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
    base_path = os.path.join(a.out, "gpu_zero1_check.json")
    if os.path.exists(base_path):
        base = json.load(open(base_path))
        for k in ("ds_zero1", "amp_fp32", "bf16_plain"):
            if isinstance(base.get(k), dict):
                res[f"vs_{k}"] = round(res["tokens_per_s"] / base[k]["tokens_per_s"], 3)
    full_path = os.path.join(a.out, "bench_train_gpu.json")
    if a.method == "lora" and os.path.exists(full_path):  # the full fine-tune of the same call
        full = json.load(open(full_path))
        res["vs_full_tokens_per_s"] = round(res["tokens_per_s"] / full["tokens_per_s"], 3)
        if full.get("max_mem_gb") and res.get("max_mem_gb"):
            res["vs_full_peak_memory"] = round(res["max_mem_gb"] / full["max_mem_gb"], 3)
    # a variant against the default run of the same call (bench_train_gpu.json: same method, same batches)
    ref = json.load(open(full_path)) if os.path.exists(full_path) else None
    for key, default, label in (
        ("compile", "none", "eager"),
        ("kernels", "none", "plain_kernels"),
        ("attention", "auto", "auto_attention"),
        ("strategy", "deepspeed", "deepspeed"),
    ):
        if ref and getattr(a, key) != default and ref.get("method") == a.method and ref.get(key, default) == default:
            res[f"vs_{label}_tokens_per_s"] = round(res["tokens_per_s"] / ref["tokens_per_s"], 3)
            res[f"{label}_final_loss"] = ref.get("final_loss")
            if ref.get("max_mem_gb") and res.get("max_mem_gb"):
                res[f"vs_{label}_peak_memory"] = round(res["max_mem_gb"] / ref["max_mem_gb"], 3)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
