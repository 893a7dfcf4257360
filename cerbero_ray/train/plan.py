"""Which rows each rank trains on, in which order: a pure function of the manifest and the config.

Ray Data splits a dataset between workers dynamically, so which rows reach which worker, and in
which order, changes from run to run, and it cannot resume an epoch in the middle. Exact resume
needs the opposite: every row's place fixed in advance. So the order is planned here:

1. Shards are shuffled (seeded, per epoch); their rows, already shuffled within a shard by the data
   stage, follow in file order. The last ``eval_rows`` rows of epoch 0's order are held out.
2. The rows are shuffled across shards (seeded, per epoch) in blocks of ``mix_block_rows`` rows of
   one shard: a shard holds one buffer of the data stage, often of one source, so without this a
   global batch would come from a handful of shards and could be all one source. With blocks of one
   row (the default) a global batch is a uniform sample of the corpus; larger blocks mean fewer,
   longer reads; 0 keeps the shard order.
3. The rest is cut into ``world_size`` contiguous ranges of ``steps × rows_per_step_per_rank`` rows
   (the remainder, under one global batch, is dropped and counted). Rank r reads range r.
4. Micro-batch k of rank r is rows ``[k × micro, (k+1) × micro)`` of its range; step s is micro-batches
   ``[s × accum, (s+1) × accum)``. Resuming at step s is reading the range from row ``s × accum × micro``.

A range is a list of :class:`Segment` (a run of rows of one shard); no data is read here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from cerbero_ray.config.train import TrainConfig, accumulation_steps


@dataclass(frozen=True)
class Segment:
    path: str
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    steps: int  # optimizer steps in this epoch
    rows_per_rank: int  # = steps × accum × micro
    dropped_rows: int  # the remainder under one global batch
    ranges: list[list[Segment]]  # per rank
    eval_ranges: list[list[Segment]]


def _ordered(shards: list[dict], seed: int, epoch: int) -> list[Segment]:
    order = np.random.default_rng([seed, epoch]).permutation(len(shards))
    return [Segment(shards[i]["path"], 0, int(shards[i]["rows"])) for i in order if shards[i]["rows"] > 0]


def _mixed(segments: list[Segment], block: int, seed: int, epoch: int) -> list[Segment]:
    """``segments`` cut into blocks of ``block`` rows of one shard, the blocks in a seeded random order
    (adjacent blocks of one shard are merged back into one segment)."""
    if block < 1:
        return segments
    blocks = [Segment(s.path, a, min(a + block, s.stop)) for s in segments for a in range(s.start, s.stop, block)]
    out: list[Segment] = []
    for i in np.random.default_rng([seed, epoch, 1]).permutation(len(blocks)):
        b = blocks[i]
        if out and out[-1].path == b.path and out[-1].stop == b.start:
            out[-1] = Segment(b.path, out[-1].start, b.stop)
        else:
            out.append(b)
    return out


def take(segments: list[Segment], start: int, stop: int) -> list[Segment]:
    """Rows ``[start, stop)`` of the concatenation of ``segments``."""
    out, at = [], 0
    for s in segments:
        lo, hi = max(start, at), min(stop, at + s.rows)
        if lo < hi:
            out.append(Segment(s.path, s.start + lo - at, s.start + hi - at))
        at += s.rows
        if at >= stop:
            break
    return out


def _split_evenly(segments: list[Segment], parts: int) -> list[list[Segment]]:
    n = sum(s.rows for s in segments)
    bounds = [n * i // parts for i in range(parts + 1)]
    return [take(segments, bounds[i], bounds[i + 1]) for i in range(parts)]


def plan_epoch(
    shards: list[dict],
    epoch: int,
    *,
    world_size: int,
    micro_batch: int,
    accum: int,
    seed: int,
    eval_rows: int = 0,
    mix_block_rows: int = 1,
) -> EpochPlan:
    """The plan for one epoch (``shards``: the manifest's ``[{path, rows}]``)."""
    if world_size < 1 or micro_batch < 1 or accum < 1:
        raise ValueError("world_size, micro_batch and accum must be >= 1")
    total = sum(int(s["rows"]) for s in shards)
    if eval_rows >= total:
        raise ValueError(f"train.eval_rows={eval_rows} leaves no training rows (the shards hold {total})")
    # held-out rows: the tail of epoch 0's order, excluded from every epoch
    base = _ordered(shards, seed, 0)
    held = take(base, total - eval_rows, total)
    held_keys = {(s.path, r) for s in held for r in range(s.start, s.stop)}
    segs = _ordered(shards, seed, epoch)
    if held_keys:
        segs = [Segment(s.path, a, b) for s in segs for a, b in _runs_without(s, held_keys)]
    segs = _mixed(segs, mix_block_rows, seed, epoch)
    usable = total - eval_rows
    per_step = world_size * micro_batch * accum
    steps = usable // per_step
    rows_per_rank = steps * micro_batch * accum
    ranges = [take(segs, r * rows_per_rank, (r + 1) * rows_per_rank) for r in range(world_size)]
    return EpochPlan(epoch, steps, rows_per_rank, usable - steps * per_step, ranges, _split_evenly(held, world_size))


def _runs_without(seg: Segment, held: set) -> list[tuple[int, int]]:
    """The runs of ``seg``'s rows that are not held out."""
    runs, start = [], None
    for r in range(seg.start, seg.stop):
        if (seg.path, r) in held:
            if start is not None:
                runs.append((start, r))
                start = None
        elif start is None:
            start = r
    if start is not None:
        runs.append((start, seg.stop))
    return runs


def remaining(plan: EpochPlan, rank: int, step: int, micro_batch: int, accum: int) -> list[Segment]:
    """Rank ``rank``'s rows from the start of optimizer step ``step`` to the end of its range."""
    return take(plan.ranges[rank], step * accum * micro_batch, plan.rows_per_rank)


def step_rows(plan: EpochPlan, step: int, micro_batch: int, accum: int) -> list[Segment]:
    """The rows of optimizer step ``step``'s global batch, all ranks together."""
    n = accum * micro_batch
    return [s for r in plan.ranges for s in take(r, step * n, (step + 1) * n)]


def plan_all(shards: list[dict], t: TrainConfig, world: int) -> list[EpochPlan]:
    """Every epoch's plan for a ``train`` config section and ``world`` ranks."""
    accum = accumulation_steps(t, world)
    return [
        plan_epoch(
            shards,
            e,
            world_size=world,
            micro_batch=t.micro_batch_size,
            accum=accum,
            seed=t.seed,
            eval_rows=t.eval_rows,
            mix_block_rows=t.mix_block_rows,
        )
        for e in range(t.epochs)
    ]


def total_steps(plans: list[EpochPlan], t: TrainConfig) -> int:
    n = sum(p.steps for p in plans)
    return min(n, t.max_steps) if t.max_steps else n


DATA_ORDER_CHANGED = (
    "this run's checkpoint was made with another data order (world size, batch sizes, epochs, seed, "
    "eval_rows, max_steps, mix_block_rows or shards changed); keep them, or use a new train.name"
)


# What shapes the trained weights besides the data order: a run resumed under other values keeps
# its checkpoint's (the weights, the optimizer's and the schedule's state: DeepSpeed and torch load
# their hyperparameters with them), so a change is refused instead of silently not applied, and a
# finished run is not returned as if trained under the new values. Kernels, attention, compilation,
# checkpointing, logging and resources may change between attempts.
TRAIN_SETTINGS = (
    "method",
    "precision",
    "strategy",
    "lr",
    "min_lr_ratio",
    "schedule",
    "warmup_steps",
    "warmup_ratio",
    "weight_decay",
    "betas",
    "eps",
    "max_grad_norm",
)
LORA_SETTINGS = ("r", "alpha", "dropout", "target_modules", "train_in_full", "lr", "qlora")
MODEL_SETTINGS = ("_target_", "path", "overrides")


def settings(c) -> dict:
    """The run's :data:`TRAIN_SETTINGS` (``train.lora.*`` too for a LoRA run) and the model it starts
    from, by config key, as they read back from a checkpoint's ``loop.json``."""
    t, m = c.train, c.model
    out = {f"train.{k}": getattr(t, k) for k in TRAIN_SETTINGS}
    if t.method == "lora":
        out |= {f"train.lora.{k}": getattr(t.lora, k) for k in LORA_SETTINGS}
    out |= {f"model.{k}": getattr(m, k) for k in MODEL_SETTINGS}
    return json.loads(json.dumps(out, default=str))


def settings_changed(recorded: dict | None, now: dict, run_dir: str) -> str | None:
    """Why the run in ``run_dir`` cannot resume under ``now`` (its newest checkpoint recorded
    ``recorded``), naming each changed key with both values; None when nothing changed (or the
    checkpoint predates the record). Keys only one side has (a later release's) are not compared."""
    if not recorded:
        return None
    both = sorted(recorded.keys() & now.keys())
    changed = [f"{k}: {recorded[k]!r} -> {now[k]!r}" for k in both if recorded[k] != now[k]]
    if not changed:
        return None
    return (
        f"{run_dir} holds a run trained with other settings ({'; '.join(changed)}): resuming it keeps "
        "its checkpoint's weights, optimizer and schedule, so they would not apply; use a new "
        "train.name, or delete the run folder to start over"
    )


def signature(shards: list[dict], t: TrainConfig, world: int, data_id: str | None = None) -> str:
    """What fixes the data order: a checkpoint only resumes a run with the same one. ``data_id``
    (:func:`cerbero_ray.train.run_plan.data_id`: what the shards hold, not where they lie) signs the
    data, so a data folder copied elsewhere (a bucket for a cluster) resumes its runs; without it,
    the shards' full paths sign it, as runs from before it did (:func:`same_order` takes both)."""
    keys = ("micro_batch_size", "global_batch_size", "epochs", "seed", "eval_rows", "max_steps")
    mix = t.mix_block_rows  # 0, the shard order, signs as runs from before the setting did
    blob = json.dumps(
        {
            **({"data": data_id, "rows": [int(s["rows"]) for s in shards]} if data_id else {"shards": shards}),
            "world": world,
            **{k: getattr(t, k) for k in keys},
            **({"mix_block_rows": mix} if mix else {}),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def same_order(recorded: str, shards: list[dict], t: TrainConfig, world: int, data_id: str | None) -> bool:
    """Whether a checkpoint's ``recorded`` signature is this run's data order: signed by what the
    shards hold (:func:`signature` with ``data_id``), or by their paths (a checkpoint from before)."""
    return recorded in (signature(shards, t, world, data_id), signature(shards, t, world))
