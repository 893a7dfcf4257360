"""The stage table: one record per stage, the only place a stage is declared. ``config.check`` reads
its schema and check, ``runtime.launch`` (every job) its runner and whether it needs Ray,
``cerbero-submit`` its name, the main job its place in the recipe, tests/test_layers.py its package
and layer. Adding a stage is one record here plus its package (``cerbero_ray/<name>/``), its conf
file and its job. Runners are named by import path, so reading the table imports no stage.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from cerbero_ray.config.data import DataStageConfig, check_data
from cerbero_ray.config.evaluate import EvaluateStageConfig, check_evaluate
from cerbero_ray.config.export import ExportStageConfig, check_export
from cerbero_ray.config.generate import GenerateStageConfig, check_generate
from cerbero_ray.config.label import LabelStageConfig, check_label
from cerbero_ray.config.recipe import RecipeConfig
from cerbero_ray.config.serve import ServeStageConfig, check_serve
from cerbero_ray.config.train import TrainStageConfig, check_train

STAGE_LAYER, JOB_LAYER = 5, 6  # the import layers of docs/ARCHITECTURE.md: stages, and what runs them


@dataclass(frozen=True)
class Stage:
    name: str
    schema: type  # the config dataclass run_<stage> gets (config.check returns one)
    check: Callable  # check(c, before): ValueError naming the key; before: the job's stages run before it
    run: str  # "module:function", called with the checked config
    ray: bool  # whether it needs a Ray cluster (export runs on the driver alone)
    resume: str  # what running the same command again does after a stop
    recipe: int | None = None  # its place in the main job (None: not one of its stages)
    layer: int = STAGE_LAYER  # the import layer of its package (or module) under cerbero_ray/
    # "module:function"(c, before): what the job reads of its local input and output before Ray
    # starts, past the config's check (the train stage's manifest, a batch stage's run record); None: nothing
    precheck: str | None = None

    @property
    def package(self) -> str:
        """The part of ``cerbero_ray`` that holds it (``cerbero_ray.<package>``), else its module."""
        module = self.run.split(":")[0]
        return module.split(".")[1] if module.startswith("cerbero_ray.") else module

    def runner(self) -> Callable:
        return _resolve(self.run)


def _resolve(path: str) -> Callable:
    module, _, fn = path.partition(":")
    return getattr(importlib.import_module(module), fn)


def precheck(name: str, c, before: frozenset = frozenset()) -> None:
    """Before Ray starts (``runtime.launch``): stage ``name``'s precheck, as its record names it, on
    the checked config ``c``. ``ValueError`` naming the key."""
    if STAGES[name].precheck:
        _resolve(STAGES[name].precheck)(c, before)


def register(stage: Stage) -> Stage:
    """Add ``stage`` to the table (what a new stage's record does; tests add a toy one)."""
    if stage.name in STAGES and STAGES[stage.name] != stage:
        raise ValueError(f"stage {stage.name!r} is declared twice")
    STAGES[stage.name] = stage
    return stage


def recipe_stages() -> list[str]:
    """The main job's stages, in the order it runs them."""
    return [s.name for s in sorted(STAGES.values(), key=lambda s: s.recipe or 0) if s.recipe is not None]


def check_recipe(c: RecipeConfig, before: frozenset = frozenset()) -> None:
    """The main job's stages (``stages: null``: every one), each checked as its record says, knowing
    which stages run before it in this job (a checkpoint the train stage writes is not there yet)."""
    available = recipe_stages()
    chosen = available if c.stages is None else list(c.stages)
    unknown = [s for s in chosen if s not in available]
    if unknown:
        raise ValueError(f"stages: unknown {unknown}; available: {available}")
    c.stages = [s for s in available if s in chosen]  # the recipe's order, whatever the list's
    for i, name in enumerate(c.stages):
        STAGES[name].check(c, frozenset(c.stages[:i]))


def precheck_recipe(c: RecipeConfig, before: frozenset = frozenset()) -> None:
    """The main job's precheck: each of its stages', knowing which stages run before it (its data
    stage writes the manifest the train stage's precheck would read)."""
    for i, name in enumerate(c.stages):
        precheck(name, c, frozenset(c.stages[:i]))


STAGES: dict[str, Stage] = {}
for _s in (
    Stage(
        "data",
        DataStageConfig,
        check_data,
        "cerbero_ray.data:run_data",
        True,
        "the same command resumes: finished buffers are kept",
        recipe=1,
    ),
    Stage(
        "train",
        TrainStageConfig,
        check_train,
        "cerbero_ray.train:run_train",
        True,
        "the same command resumes from its last complete checkpoint",
        recipe=2,
        precheck="cerbero_ray.train.run_plan:check_local_data",
    ),
    Stage(
        "label",
        LabelStageConfig,
        check_label,
        "cerbero_ray.label:run_label",
        True,
        "the same command resumes: finished chunks are kept",
        recipe=3,
        precheck="cerbero_ray.label.pipeline:precheck",
    ),
    Stage(
        "generate",
        GenerateStageConfig,
        check_generate,
        "cerbero_ray.generate:run_generate",
        True,
        "the same command resumes: finished chunks are kept",
        precheck="cerbero_ray.generate.pipeline:precheck",
    ),
    Stage(
        "serve",
        ServeStageConfig,
        check_serve,
        "cerbero_ray.serve:run_serve",
        True,
        "the same command starts the server again",
    ),
    Stage(  # before evaluate: the Q4_K_M file is one of the models evaluated
        "export",
        ExportStageConfig,
        check_export,
        "cerbero_ray.export:run_export",
        False,
        "the same command makes the files it did not finish",
        recipe=4,
    ),
    Stage(
        "evaluate",
        EvaluateStageConfig,
        check_evaluate,
        "cerbero_ray.evaluate:run_evaluate",
        True,
        "the same command resumes: finished tasks are kept",
        recipe=5,
    ),
    Stage(
        "recipe",
        RecipeConfig,
        check_recipe,
        "cerbero_ray.recipe:run_recipe",
        True,
        "the same command resumes: finished stages, chunks and checkpoints are kept",
        layer=JOB_LAYER,
        precheck="cerbero_ray.config.stages:precheck_recipe",
    ),
):
    register(_s)
