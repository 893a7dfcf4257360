"""The stage table: one record per stage, read by ``launch`` (the jobs), ``cerbero-submit`` and the
main job. A stage's schema and check live in :mod:`cerbero_ray.config` under the same name; its
``run_<stage>`` is named here by import path, so reading the table imports no stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    run: str  # "module:function", called with the checked config
    ray: bool  # whether it needs a Ray cluster (export runs on the driver alone)
    resume: str  # what running the same command again does after a stop

    def runner(self):
        module, _, fn = self.run.partition(":")
        return getattr(importlib.import_module(module), fn)


STAGES = {
    s.name: s
    for s in (
        Stage(
            "data",
            "cerbero_ray.data:run_data",
            True,
            "the same command starts it again (the unfinished shards are cleared)",
        ),
        Stage(
            "train", "cerbero_ray.train:run_train", True, "the same command resumes from its last complete checkpoint"
        ),
        Stage("label", "cerbero_ray.label:run_label", True, "the same command resumes: finished chunks are kept"),
        Stage(
            "generate", "cerbero_ray.generate:run_generate", True, "the same command resumes: finished chunks are kept"
        ),
        Stage("serve", "cerbero_ray.serve:run_serve", True, "the same command starts the server again"),
        Stage(
            "evaluate", "cerbero_ray.evaluate:run_evaluate", True, "the same command resumes: finished tasks are kept"
        ),
        Stage("export", "cerbero_ray.export:run_export", False, "the same command makes the files it did not finish"),
        Stage(
            "recipe",
            "cerbero_ray.recipe:run_recipe",
            True,
            "the same command resumes: finished stages, chunks and checkpoints are kept",
        ),
    )
}
