"""The training loop without Ray: one process, or one per GPU under torchrun.

Same configs, same loop, same checkpoints layout as ``jobs/train.py``; rows are read in-process
instead of through Ray Data. For machines without Ray (GPU benchmarks) and for debugging.

    python -m cerbero_ray.train.local train.num_workers=1
    torchrun --nproc-per-node 8 -m cerbero_ray.train.local train=zero1_8xh100 model=hf model.path=…
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

from cerbero_ray.config import check, compose
from cerbero_ray.tracking import flat_config, open_run
from cerbero_ray.train.env import LocalEnv
from cerbero_ray.train.loop import train_loop
from cerbero_ray.train.plan import plan_all, total_steps
from cerbero_ray.train.run_plan import check_resume, plan_run


def run_local(overrides: list[str]) -> dict:
    world = int(os.environ.get("WORLD_SIZE", 1))
    c = check("train", compose("train", [f"train.num_workers={world}", *overrides]))
    plan = plan_run(c)
    t = c.train
    # another data order or other settings: said before this process builds its model
    check_resume(plan, c, total_steps(plan_all(list(plan.shards), t, t.num_workers), t))
    if int(os.environ.get("RANK", 0)) == 0:  # the experiment tracker's run, which rank 0 alone logs into
        plan = replace(plan, tracker=open_run(t.tracker, "train.tracker", t.name, plan.run_dir, flat_config(c)))
    env = LocalEnv(
        plan.run_dir,
        keep=t.keep_checkpoints,
        fail_at_step=t.fail_at_step,
        fail_rank=t.fail_rank,
    )
    summary = train_loop(c, plan, env)
    env.close()
    return summary


if __name__ == "__main__":
    from cerbero_ray.logs import console

    console()
    summary = run_local(sys.argv[1:])
    if summary:
        print(summary, flush=True)
