"""The per-worker training loop: plain PyTorch + DeepSpeed, no Ray import.

Ray Train runs :func:`train_loop` in every worker with a :class:`~cerbero_ray.train.env.RayEnv`;
``python -m cerbero_ray.train.local`` (torchrun or one process) runs it with a
:class:`~cerbero_ray.train.env.LocalEnv`. One optimizer step:

1. take ``accum`` micro-batches of this rank's planned rows (:mod:`cerbero_ray.train.plan`);
2. count their loss tokens and all-reduce the count: N, the loss tokens of the whole global batch;
3. forward + backward each micro-batch on ``sum of token losses × world × accum / N``; DeepSpeed
   divides by ``accum`` and averages over ranks, so the gradient is that of the token-weighted mean
   over the global batch (not a mean of per-micro-batch means);
4. DeepSpeed clips, steps AdamW and the schedule at the accumulation boundary.

Checkpoints carry the step, so a restarted worker re-plans and reads from exactly the next row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time

import torch
import torch.distributed as dist

from cerbero_ray import storage
from cerbero_ray.data.packing import IGNORE_INDEX
from cerbero_ray.train import checkpoint as ckpt
from cerbero_ray.train.engine import build_engine
from cerbero_ray.train.metrics import Writer, loss_png, progress_line
from cerbero_ray.train.modeling import count_flops_per_token, peak_flops
from cerbero_ray.train.plan import EpochPlan, plan_epoch, remaining

log = logging.getLogger(__name__)
FAULT_MARKER = ".fault_injected"
SUMMARY = "summary.json"


def say(line: str) -> None:
    """One line to stdout (under Ray Train: forwarded to the driver once, not through its print patch)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def plan_all(shards: list[dict], t: dict, world: int) -> list[EpochPlan]:
    accum = t["global_batch_size"] // (t["micro_batch_size"] * world)
    return [plan_epoch(shards, e, world_size=world, micro_batch=t["micro_batch_size"], accum=accum,
                       seed=t["seed"], eval_rows=t["eval_rows"]) for e in range(t["epochs"])]


def total_steps(plans: list[EpochPlan], t: dict) -> int:
    n = sum(p.steps for p in plans)
    return min(n, t["max_steps"]) if t.get("max_steps") else n


def signature(shards: list[dict], t: dict, world: int) -> str:
    """What fixes the data order: a checkpoint only resumes a run with the same one."""
    keys = ("micro_batch_size", "global_batch_size", "epochs", "seed", "eval_rows", "max_steps")
    blob = json.dumps({"shards": shards, "world": world, **{k: t.get(k) for k in keys}}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _to_device(b: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    # torch.tensor copies: Ray Data hands out read-only arrays
    return tuple(torch.tensor(b[k]).to(device, non_blocking=True) for k in ("input_ids", "labels", "position_ids"))


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
    return x


def train_step(engine, batches: list[dict], device: torch.device, world: int) -> tuple[float, int]:
    """One optimizer step over ``batches`` (this rank's micro-batches); returns (global loss, N)."""
    local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    n = int(_all_sum(torch.tensor(float(local), dtype=torch.float64, device=device)).item())
    scale = world * len(batches) / n if n else 0.0
    total = torch.zeros((), dtype=torch.float64, device=device)
    for b in batches:
        loss_sum, _ = engine(*_to_device(b, device))
        engine.backward(loss_sum * scale)
        engine.step()
        total += loss_sum.detach().double()
    loss = _all_sum(total).item() / n if n else float("nan")
    return loss, n


@torch.no_grad()
def evaluate(engine, env, segments, device: torch.device, read_cpus: float) -> float | None:
    """Token-weighted held-out loss over every rank's share of the held-out rows."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for b in env.batches(segments, 1, read_cpus) if segments else ():
        loss_sum, n = engine(*_to_device(b, device))
        sums += torch.stack([loss_sum.double(), n.double()])
    engine.train()
    s, n = _all_sum(sums).tolist()
    return s / n if n else None


def train_loop(config: dict, env) -> dict:
    """Train on this worker; every worker runs it. Returns rank 0's summary (others: {})."""
    t, run = config["train"], config["run"]
    rank, world, device = env.rank, env.world_size, env.device
    plans = plan_all(run["shards"], t, world)
    total, sig = total_steps(plans, t), signature(run["shards"], t, world)
    engine, sched, lm = build_engine(config, total, device, world)
    state = {"step": 0, "history": [], "signature": sig}
    resumed_from = None
    d = env.latest_checkpoint()
    if d:
        client = ckpt.load(engine, d, rank)["loop"]
        if client["signature"] != sig:
            raise ValueError("this run's checkpoint was made with another data order (world size, batch sizes, "
                             "epochs, seed, eval_rows or shards changed); keep them, or use a new train.name")
        state, resumed_from = client, client["step"]
        if rank == 0:
            say(f"[train] resumed from step {state['step']} ({d})")
    step, history = state["step"], state["history"]
    tok = writer = None
    if rank == 0:
        tc = config.get("tokenizer")
        if tc:  # None in benchmarks: no tokenizer in the HF export
            from cerbero_ray.tokenizer import build_tokenizer

            tok = build_tokenizer(tc.get("path"), tc["assistant_tag"], tc["system_line"])
        writer = Writer(run["run_dir"], step)

    def record(m: dict) -> None:
        history.append(m)
        if writer:
            writer.scalars(m["step"], {k: v for k, v in m.items() if k not in ("step", "epoch")})

    def save(at: int) -> None:
        d = env.checkpoint_dir(at)
        client = {"loop": {"step": at, "history": history, "signature": sig}}
        ckpt.save(engine, d, rank, client, lm if (rank == 0 and t["hf_in_checkpoints"]) else None, tok)
        if writer:
            writer.history(history)
            writer.sync()
        env.report({**(history[-1] if history else {}), "step": at}, checkpoint=d)

    seq_len, micro = run["seq_len"], t["micro_batch_size"]
    accum = t["global_batch_size"] // (micro * world)
    read_cpus = float(t.get("read_cpus", 0.25))
    if step == 0 and t["eval_rows"]:
        record({"step": 0, "eval_loss": evaluate(engine, env, plans[0].eval_ranges[rank], device, read_cpus)})
    flops_tok = count_flops_per_token(lm, seq_len)
    peak = peak_flops(device, torch.bfloat16 if t["precision"] == "bf16" else torch.float32, t.get("peak_tflops"))
    tokens_per_step = world * accum * micro * seq_len
    t_start, start_step, last_saved = time.perf_counter(), step, step
    epoch_start = 0
    for plan in plans:
        if step >= total:
            break
        if step >= epoch_start + plan.steps:
            epoch_start += plan.steps
            continue
        it = iter(env.batches(remaining(plan, rank, step - epoch_start, micro, accum), micro, read_cpus))
        while step < min(epoch_start + plan.steps, total):
            t0 = time.perf_counter()
            lr = sched.get_last_lr()[0]
            loss, n = train_step(engine, [next(it) for _ in range(accum)], device, world)
            step += 1
            dt = time.perf_counter() - t0
            gn = engine.get_global_grad_norm()
            m = {"step": step, "epoch": plan.epoch, "loss": loss, "lr": lr,
                 "grad_norm": float(gn) if gn is not None else float("nan"), "loss_tokens": n,
                 "tokens_per_s": tokens_per_step / dt, "step_s": dt,
                 "mfu": flops_tok * tokens_per_step / dt / world / peak if peak else None,
                 "eta_s": (time.perf_counter() - t_start) / (step - start_step) * (total - step)}
            if t["eval_every"] and step % t["eval_every"] == 0 and step < total and t["eval_rows"]:
                m["eval_loss"] = evaluate(engine, env, plans[0].eval_ranges[rank], device, read_cpus)
            record(m)
            if rank == 0 and (step % t["log_every"] == 0 or step == total):
                say(progress_line(m, total) + (f" | held-out {m['eval_loss']:.4f}" if m.get("eval_loss") else ""))
            _maybe_fail(t, rank, step, run["run_dir"])
            if t["checkpoint_every"] and step % t["checkpoint_every"] == 0 and step < total:
                save(step)
                last_saved = step
            elif step % t["log_every"] == 0:
                env.report(m)
        epoch_start += plan.steps
    if t["eval_rows"] and (not history or "eval_loss" not in history[-1] or history[-1]["step"] != step):
        ev = evaluate(engine, env, plans[0].eval_ranges[rank], device, read_cpus)
        if history and history[-1]["step"] == step:
            history[-1]["eval_loss"] = ev
        else:
            record({"step": step, "eval_loss": ev})
        if rank == 0:
            say(f"[train] held-out loss at step {step}: {ev:.4f}")
    if last_saved != step or start_step == step == 0:
        save(step)
    return _finish(config, env, lm, tok, writer, history, step, resumed_from)


def _maybe_fail(t: dict, rank: int, step: int, run_dir: str) -> None:
    """Fault injection: rank ``fail_rank`` dies abruptly after step ``fail_at_step``, once per run."""
    if t.get("fail_at_step") != step or rank != t.get("fail_rank", 1):
        return
    fs, p = storage.resolve(storage.join(run_dir, FAULT_MARKER))
    if fs.get_file_info(p).is_file:
        return
    fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(str(step).encode())
    say(f"[train] fault injection: rank {rank} exits after step {step}")
    os._exit(1)


def _finish(config: dict, env, lm, tok, writer, history: list[dict], step: int, resumed_from: int | None) -> dict:
    if env.rank != 0:
        return {}
    run_dir = config["run"]["run_dir"]
    hf_local = os.path.join(writer.local, "hf")
    ckpt.save_hf(lm, tok, hf_local)
    writer.history(history)
    try:
        loss_png(history, os.path.join(writer.local, "loss.png"), f"{config['train']['name']}: {step} steps")
    except ImportError:  # matplotlib is a dependency; a bare benchmark machine may lack it
        log.warning("no matplotlib: loss.png not written")
    writer.close()
    evals = [h["eval_loss"] for h in history if h.get("eval_loss") is not None]
    losses = [h["loss"] for h in history if "loss" in h]
    speeds = sorted(h["tokens_per_s"] for h in history if "tokens_per_s" in h)
    summary = {"steps": step, "resumed_from": resumed_from, "run_dir": run_dir, "hf_dir": storage.join(run_dir, "hf"),
            "loss_png": storage.join(run_dir, "loss.png"), "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None, "eval_losses": evals,
            "tokens_per_s_median": speeds[len(speeds) // 2] if speeds else None}
    fs, p = storage.resolve(storage.join(run_dir, SUMMARY))
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(summary, indent=1).encode())
    return summary


def read_summary(run_dir: str) -> dict:
    """The summary rank 0 wrote at the end of the run."""
    fs, p = storage.resolve(storage.join(run_dir, SUMMARY))
    with fs.open_input_stream(p) as f:
        return json.loads(f.read())
