"""The main job's schema: the recipe's stages on one cluster, one composed config. Which stages it
runs, in which order, and how each is checked is the stage table's (``config/stages.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from cerbero_ray.config.common import ModelConfig
from cerbero_ray.config.data import DataStageConfig
from cerbero_ray.config.evaluate import EvaluateConfig
from cerbero_ray.config.export import ExportConfig
from cerbero_ray.config.label import LabelConfig
from cerbero_ray.config.train import DeepSpeedConfig, TrainConfig


@dataclass
class RecipeConfig(DataStageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    label: LabelConfig = field(default_factory=LabelConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    # null: every recipe stage; a list: those, in the recipe's order (the check fills it in)
    stages: Optional[List[str]] = None
