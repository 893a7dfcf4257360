"""The per-worker training loop: plain PyTorch + DeepSpeed (or ``train.strategy=torch``), no Ray import.

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

import contextlib
import functools
import os
import sys
import time

import torch
import torch.distributed as dist

from cerbero_ray import storage
from cerbero_ray.config.train import TrainStageConfig, accumulation_steps
from cerbero_ray.shards import IGNORE_INDEX
from cerbero_ray.train import checkpoint as ckpt
from cerbero_ray.train.env import TrainEnv
from cerbero_ray.train.metrics import Writer, progress_line, summarize, write_summary
from cerbero_ray.train.modeling import count_flops_per_token, peak_flops
from cerbero_ray.train.plan import (
    DATA_ORDER_CHANGED,
    plan_all,
    remaining,
    same_order,
    settings,
    settings_changed,
    signature,
    total_steps,
)
from cerbero_ray.train.reader import local_batches
from cerbero_ray.train.run_plan import RunPlan
from cerbero_ray.train.zero import build_engine


def say(line: str) -> None:
    """One line to stdout (under Ray Train: forwarded to the driver once, not through its print patch)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _to_device(b: dict, device: torch.device) -> tuple[torch.Tensor, ...]:
    # Ray Data hands out read-only arrays, which torch.tensor copies; a tensor (the Ray-free loader's) is moved as is
    return tuple(
        (x if isinstance(x := b[k], torch.Tensor) else torch.tensor(x)).to(device, non_blocking=True)
        for k in ("input_ids", "labels", "position_ids")
    )


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
def evaluate(engine, segments, device: torch.device) -> float | None:
    """Token-weighted held-out loss over every rank's share of the held-out rows. They are read in
    this process whatever the env: a few rows, for which a Ray Data pipeline per evaluation took
    longer to start than to read them, beside the training rows' own pipeline."""
    engine.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for b in local_batches(segments, 1) if segments else ():
        loss_sum, n = engine(*_to_device(b, device))
        sums += torch.stack([loss_sum.double(), n.double()])
    engine.train()
    s, n = _all_sum(sums).tolist()
    return s / n if n else None


def out_of_memory(t, seq_len: int, accum: int, device: torch.device, what: str, resumed: bool = False) -> str:
    """What to change when a step runs out of memory (the card's figures on CUDA). ``resumed``: the
    run resumed from a checkpoint, whose data order (the micro-batch is part of it) a resume keeps."""
    mem = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        mem = f"; {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB allocated at most, of {total / 2**30:.1f}"
    return (
        f"train: out of memory in {what}, before this attempt finished a step ({accum} micro-batch(es) of "
        f"train.micro_batch_size={t.micro_batch_size} row(s) x {seq_len} tokens per rank and step{mem}): every "
        "restart would run out the same way. Lower train.micro_batch_size (train.global_batch_size stays: more "
        "micro-batches accumulate), keep train.gradient_checkpointing=true, or train on more GPUs (ZeRO-1 "
        "shards the optimizer's states over them) or with train.method=lora"
        + (
            " (this run resumed from a checkpoint, whose data order a resume keeps: another micro-batch "
            "or GPU count needs another train.name; or resume it on cards with more memory)"
            if resumed
            else ""
        )
    )


class _Run:
    """One worker's training run: the engine, the plan, the history, and where they are written."""

    def __init__(self, config: TrainStageConfig, plan: RunPlan, env: TrainEnv, tracker=None):
        t = config.train
        self.config, self.plan, self.t, self.env = config, plan, t, env
        self.rank, self.world, self.device = env.rank, env.world_size, env.device
        self.plans = plan_all(list(plan.shards), t, self.world)
        self.total, self.sig = total_steps(self.plans, t), signature(list(plan.shards), t, self.world, plan.data_id)
        self.tok = self.writer = self.base_record = None
        self.tracker = tracker  # rank 0's (cerbero_ray.tracking.Tracker), or None
        if self.rank == 0:  # the HF export's tokenizer
            from cerbero_ray.tokenizer import build_tokenizer

            tc = config.tokenizer
            self.tok = build_tokenizer(tc.path, tc.assistant_tag, tc.system_line)
        self.lora = t.method == "lora"
        on_base = self._record_base if self.lora and self.rank == 0 else None
        self.engine, self.sched, self.lm, self.peft = build_engine(config, self.total, self.device, self.world, on_base)
        self.micro = t.micro_batch_size
        self.accum = accumulation_steps(t, self.world)
        self.read_cpus = float(t.read_cpus)
        self.step, self.history, self.resumed_from = 0, [], None

    @contextlib.contextmanager
    def first_oom(self, what: str):
        """Out of memory before this attempt has finished a step is a verdict, not a failure to
        retry: the rows are packed to one length, so every restart (each building the model again)
        would run out at the same place. Later, a restart may pass (fragmentation): re-raised."""
        try:
            yield
        except torch.OutOfMemoryError as e:
            start = self.resumed_from or 0  # where this attempt began
            if self.step > start:  # steps passed in this attempt
                raise
            why = out_of_memory(self.t, self.plan.seq_len, self.accum, self.device, what, start > 0)
            raise ValueError(why) from e

    def _record_base(self, lm) -> None:
        """Rank 0, LoRA: the frozen base's identity (a random-init base is written to <run>/base)."""
        from cerbero_ray.train.lora import record_of, save_base

        path = self.config.model.path
        self.base_record = record_of(path) if path else save_base(lm, self.tok, self.plan.run_dir)

    @property
    def model_kind(self) -> str:
        """The folder the run's model goes into, and the kind of its card: ``adapter`` for LoRA, else ``hf``."""
        return "adapter" if self.lora else "hf"

    def write_model(self, folder: str, card: str | None = None) -> str:
        """Rank 0: the model into ``folder`` (``hf/``, or ``adapter/`` for LoRA), with its model
        ``card``; returns its path."""
        d = os.path.join(folder, self.model_kind)
        if self.lora:
            from cerbero_ray.train.lora import save_adapter

            save_adapter(self.peft, self.tok, self.base_record, d, card=card)
        else:
            # train.strategy=torch trains fp32 weights under bf16 autocast: its model is written in bf16, as DeepSpeed's
            cast = self.t.strategy == "torch" and self.t.precision == "bf16"
            ckpt.save_hf(self.lm, self.tok, d, torch.bfloat16 if cast else None, card=card)
        return d

    def extra(self) -> dict:
        """Rank 0, at the end: the summary's method, parameter counts, adapter paths, peak memory."""
        run_dir = self.plan.run_dir
        out = {"method": self.t.method}
        if self.lora:
            from cerbero_ray.train.lora import counts

            trainable, total = counts(self.lm)
            merged = self.t.lora.merge
            out.update(
                trainable_params=trainable,
                total_params=total,
                trainable_share=trainable / total,
                adapter_dir=storage.join(run_dir, "adapter"),
                base=self.base_record["base"],
                hf_dir=storage.join(run_dir, "hf") if merged else None,
            )
        else:
            n = sum(p.numel() for p in self.lm.parameters())
            out.update(trainable_params=n, total_params=n, trainable_share=1.0)
        out["peak_memory_bytes"] = peak_memory(self.device)
        # what the data stage checked the data against (an evaluation reads it: cerbero_ray/evaluate/report.py)
        manifest = self.card_inputs[0] or {}
        out["data"] = {"dir": self.t.data_dir, "dedup": manifest.get("dedup")}
        return out

    @functools.cached_property
    def card_inputs(self) -> tuple[dict | None, str]:
        """Rank 0: what every card of the run reads (the data stage's manifest, None when it does not
        read; the chat template on the card's example), read once."""
        from cerbero_ray.shards import read_manifest
        from cerbero_ray.train.card import EXAMPLE

        try:
            manifest = read_manifest(self.t.data_dir)
        except (OSError, ValueError):
            manifest = None
        return manifest, self.tok.apply_chat_template(EXAMPLE, tokenize=False, add_generation_prompt=True)

    def card(self, summary: dict, kind: str) -> str | None:
        """Rank 0: the model card of the folder ``kind`` (:mod:`cerbero_ray.train.card`); None (a
        warning) when it cannot be made: the model is written without one."""
        from cerbero_ray.train.card import card_text

        try:
            return card_text(self.config, summary, *self.card_inputs, kind)
        except Exception as e:  # a card is documentation: never the reason a trained model is lost
            say(f"[train] warning: no model card in {kind}/: {type(e).__name__}: {e}")
            return None

    def _checkpoint_card(self, at: int) -> str | None:
        """Rank 0: the card of a checkpoint's model folder: the run so far, marked as a checkpoint."""
        try:
            so_far = summarize(self.plan.run_dir, self.history, at, self.resumed_from, self.extra())
        except Exception as e:  # documentation: never the reason a checkpoint is lost
            say(f"[train] warning: no model card in the checkpoint at step {at}: {type(e).__name__}: {e}")
            return None
        return self.card({**so_far, "total_steps": self.total}, self.model_kind)

    def resume(self) -> None:
        """Load the newest complete checkpoint, if any (refused when the data order changed)."""
        d = self.env.latest_checkpoint()
        if d:
            recorded = (ckpt.read_record(d) or {}).get("settings")
            why = settings_changed(recorded, settings(self.config), self.plan.run_dir)
            if why:  # before the load, which a changed model would fail deep inside DeepSpeed
                raise ValueError(why)  # the driver's check_resume says it first on Ray
            state = ckpt.load(self.engine, d, self.rank, frozen=self.lora)["loop"]
            self.env.loaded()
            order = same_order(state["signature"], list(self.plan.shards), self.t, self.world, self.plan.data_id)
            if not order and state["step"] < self.total:  # a finished run reads nothing more
                raise ValueError(DATA_ORDER_CHANGED)  # the driver's check_resume: unless it predates loop.json
            self.step, self.history, self.resumed_from = state["step"], state["history"], state["step"]
            if self.rank == 0:
                say(f"[train] resumed from step {self.step} ({d})")
        if self.rank == 0:
            self.writer = Writer(self.plan.run_dir, self.step, self.tracker)

    def record(self, m: dict) -> None:
        self.history.append(m)
        if self.writer:
            self.writer.scalars(m["step"], {k: v for k, v in m.items() if k not in ("step", "epoch")})

    def save(self, at: int) -> None:
        d = self.env.checkpoint_dir(at)
        client = {"loop": {"step": at, "history": self.history, "signature": self.sig}}
        write = None
        if self.t.hf_in_checkpoints:
            write = lambda folder: self.write_model(folder, self._checkpoint_card(at))  # noqa: E731
        ckpt.save(self.engine, d, self.rank, client, write, frozen=self.lora)
        if self.rank == 0:
            ckpt.write_record(d, at, self.sig, settings(self.config))
        if self.writer:
            self.writer.history(self.history)
            self.writer.sync()
        self.env.report({**(self.history[-1] if self.history else {}), "step": at}, checkpoint=d)

    def held_out(self) -> float | None:
        with self.first_oom("the held-out evaluation"):
            return evaluate(self.engine, self.plans[0].eval_ranges[self.rank], self.device)

    def one_step(self, it, epoch: int, timing: tuple[float, int]) -> dict:
        """Train one optimizer step from the batch iterator ``it``; returns its metrics."""
        t = self.t
        t0, lr = time.perf_counter(), self.sched.get_last_lr()[0]
        with self.first_oom(f"step {self.step + 1}"):
            loss, n = train_step(self.engine, [next(it) for _ in range(self.accum)], self.device, self.world)
        self.step += 1
        dt = time.perf_counter() - t0
        gn = self.engine.get_global_grad_norm()
        tokens = self.world * self.accum * self.micro * self.plan.seq_len
        t_start, start_step = timing
        m = {
            "step": self.step,
            "epoch": epoch,
            "loss": loss,
            "lr": lr,
            "grad_norm": float(gn) if gn is not None else float("nan"),
            "loss_tokens": n,
            "tokens_per_s": tokens / dt,
            "step_s": dt,
            "mfu": self.flops_tok * tokens / dt / self.world / self.peak if self.peak else None,
            "eta_s": (time.perf_counter() - t_start) / (self.step - start_step) * (self.total - self.step),
        }
        if t.eval_every and self.step % t.eval_every == 0 and self.step < self.total and t.eval_rows:
            m["eval_loss"] = self.held_out()
        return m

    def train(self) -> int:
        """Every remaining step, from ``self.step``; returns the last step checkpointed."""
        t = self.t
        self.flops_tok = count_flops_per_token(self.lm, self.plan.seq_len)
        dtype = torch.bfloat16 if t.precision == "bf16" else torch.float32
        self.peak = peak_flops(self.device, dtype, t.peak_tflops)
        timing, last_saved, epoch_start = (time.perf_counter(), self.step), self.step, 0
        for plan in self.plans:
            if self.step >= self.total:
                break
            if self.step >= epoch_start + plan.steps:
                epoch_start += plan.steps
                continue
            segments = remaining(plan, self.rank, self.step - epoch_start, self.micro, self.accum)
            it = iter(self.env.batches(segments, self.micro, self.read_cpus))
            while self.step < min(epoch_start + plan.steps, self.total):
                m = self.one_step(it, plan.epoch, timing)
                if t.compile != "none" and self.rank == 0 and self.step == timing[1] + 1:
                    say(f"[train] first step {m['step_s']:.1f} s, the layers' compilation included (train.compile)")
                self.record(m)
                if self.rank == 0 and (self.step % t.log_every == 0 or self.step == self.total):
                    held = f" | held-out {m['eval_loss']:.4f}" if m.get("eval_loss") else ""
                    say(progress_line(m, self.total) + held)
                self.env.after_step(self.step)
                if t.checkpoint_every and self.step % t.checkpoint_every == 0 and self.step < self.total:
                    self.save(self.step)
                    last_saved = self.step
                elif self.step % t.log_every == 0:
                    self.env.report(m)
            epoch_start += plan.steps
        return last_saved

    def final_eval(self) -> None:
        """The held-out loss at the last step, unless that step already has it."""
        h = self.history
        if not self.t.eval_rows or (h and "eval_loss" in h[-1] and h[-1]["step"] == self.step):
            return
        ev = self.held_out()
        if h and h[-1]["step"] == self.step:
            h[-1]["eval_loss"] = ev
            if self.writer:
                self.writer.scalars(self.step, {"eval_loss": ev})
        else:
            self.record({"step": self.step, "eval_loss": ev})
        if self.rank == 0:
            say(f"[train] held-out loss at step {self.step}: {ev:.4f}")


def train_loop(config: TrainStageConfig, plan: RunPlan, env: TrainEnv) -> dict:
    """Train on this worker (``plan``: the run's :class:`~cerbero_ray.train.run_plan.RunPlan`;
    ``env``: a :class:`~cerbero_ray.train.env.TrainEnv`); every worker runs it. Returns rank 0's
    summary (others: {}). Rank 0 logs into the run's experiment tracker (``plan.tracker``), and
    marks it failed when the training fails here."""
    tracker = None
    if env.rank == 0 and plan.tracker:  # before the model: a tracker that refuses costs no model load
        from cerbero_ray.tracking import Tracker, flat_config

        tracker = Tracker(plan.tracker, flat_config(config), plan.run_dir, "train.tracker")
    try:
        return _train(config, plan, env, tracker)
    except BaseException as e:
        if tracker is not None:
            tracker.finish(e)
        raise


def _train(config: TrainStageConfig, plan: RunPlan, env: TrainEnv, tracker) -> dict:
    r = _Run(config, plan, env, tracker)
    r.resume()
    start = r.step
    if r.step == 0 and r.t.eval_rows:
        r.record({"step": 0, "eval_loss": r.held_out()})
    last_saved = r.train()
    r.final_eval()
    if last_saved != r.step or start == r.step == 0:
        r.save(r.step)
    if r.rank != 0:
        return {}
    local = r.writer.local
    summary = summarize(plan.run_dir, r.history, r.step, r.resumed_from, r.extra())
    done = os.path.join(local, r.model_kind, "adapter_config.json" if r.lora else "config.json")
    if start != r.step or not os.path.isfile(done):  # a finished run leaves it be
        r.write_model(local, r.card(summary, r.model_kind))
    hf = os.path.join(local, "hf")
    if r.lora and r.t.lora.merge and (start != r.step or not os.path.isfile(os.path.join(hf, "config.json"))):
        ckpt.save_hf(r.peft.merge_and_unload(), r.tok, hf, card=r.card(summary, "hf"))
    return write_summary(config.train.name, r.writer, r.history, summary)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes this process held: the GPU's allocator peak, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB
    except (ImportError, OSError):
        return None
