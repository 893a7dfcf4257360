"""The main job's schema: the recipe's stages in order on one cluster, one composed config."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from cerbero_ray.config.common import ModelConfig
from cerbero_ray.config.data import DataStageConfig, check_data
from cerbero_ray.config.evaluate import EvaluateConfig, check_evaluate
from cerbero_ray.config.export import ExportConfig, check_export
from cerbero_ray.config.label import LabelConfig, check_label
from cerbero_ray.config.train import DeepSpeedConfig, TrainConfig, check_train

RECIPE_STAGES = ("data", "train", "label", "export", "evaluate")  # evaluate last: it also scores the GGUF file


@dataclass
class RecipeConfig(DataStageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    stages: List[str] = field(default_factory=lambda: list(RECIPE_STAGES))


def check_recipe(c: RecipeConfig) -> None:
    unknown = [s for s in c.stages if s not in RECIPE_STAGES]
    if unknown:
        raise ValueError(f"stages: unknown {unknown}; available: {list(RECIPE_STAGES)}")
    checks = {  # a checkpoint that the train stage of this job writes is not there yet
        "data": check_data,
        "train": check_train,
        "label": lambda c: check_label(c, checkpoint="train" not in c.stages),
        "evaluate": lambda c: check_evaluate(c, checkpoints="train" not in c.stages and "export" not in c.stages),
        "export": lambda c: check_export(c, checkpoint="train" not in c.stages),
    }
    for stage in c.stages:
        checks[stage](c)
