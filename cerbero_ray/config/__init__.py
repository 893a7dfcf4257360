"""Typed config schemas, composed with Hydra, checked before anything runs.

Each stage's schema and its ``check_<stage>(c)`` live in ``cerbero_ray/config/<stage>.py``; they
are registered with Hydra's ConfigStore so that a misspelled or unknown key fails when the config
is composed, and :func:`check` runs the stage's value checks (a ``ValueError`` naming the key) on the
composed config, before Ray starts — in ``jobs/<stage>.py`` and in ``cerbero-submit`` alike. Checks
that must read storage (a data manifest, a checkpoint) stay in ``run_<stage>``. Importing this
package imports neither torch nor transformers.
"""

from __future__ import annotations

import os

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from cerbero_ray.config.common import ModelConfig
from cerbero_ray.config.data import DataStageConfig, SourceConfig, check_data
from cerbero_ray.config.evaluate import EvalTaskConfig, EvaluateStageConfig, check_evaluate
from cerbero_ray.config.export import ExportStageConfig, check_export
from cerbero_ray.config.generate import GenerateStageConfig, check_generate
from cerbero_ray.config.label import LabelStageConfig, check_label
from cerbero_ray.config.recipe import RecipeConfig, check_recipe
from cerbero_ray.config.serve import ServeStageConfig, check_serve
from cerbero_ray.config.train import TrainStageConfig, check_train

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGE_SCHEMAS = {
    "data": DataStageConfig,
    "train": TrainStageConfig,
    "label": LabelStageConfig,
    "generate": GenerateStageConfig,
    "serve": ServeStageConfig,
    "evaluate": EvaluateStageConfig,
    "export": ExportStageConfig,
    "recipe": RecipeConfig,
}
CHECKS = {
    "data": check_data,
    "train": check_train,
    "label": check_label,
    "generate": check_generate,
    "serve": check_serve,
    "evaluate": check_evaluate,
    "export": check_export,
    "recipe": check_recipe,
}


def _resolve_cwd() -> str:
    return os.getcwd()


def _trained_folder(method: str) -> str:
    """``${trained_folder:${train.method}}``: the folder a training run leaves its model in."""
    return "adapter" if method == "lora" else "hf"


def register_configs() -> None:
    """Register schemas and resolvers (idempotent)."""
    if not OmegaConf.has_resolver("repo_dir"):
        OmegaConf.register_new_resolver("repo_dir", lambda: REPO_DIR)
        OmegaConf.register_new_resolver("cwd", _resolve_cwd)
    if not OmegaConf.has_resolver("trained_folder"):
        OmegaConf.register_new_resolver("trained_folder", _trained_folder)
    cs = ConfigStore.instance()
    for name, node in STAGE_SCHEMAS.items():
        cs.store(name=f"{name}_schema", node=node)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data/source", name="source_schema", node=SourceConfig)
    cs.store(group="evaluate/task", name="task_schema", node=EvalTaskConfig)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts: what goes to Ray workers (``${…}`` never resolves there)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


class Checked(dict):
    """A resolved config that passed the checks of ``checked`` (stages) in this process: checking it
    for one of them again is a no-op, so a job's config is checked once (the recipe's check covers
    its stages), not again by each ``run_<stage>``."""

    checked: frozenset = frozenset()


def check(stage: str, cfg: DictConfig | dict) -> Checked:
    """Run ``check_<stage>`` on the composed config (once); returns it resolved, as plain dicts."""
    if isinstance(cfg, Checked) and stage in cfg.checked:
        return cfg
    c = to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    CHECKS[stage](c)
    out = c if isinstance(c, Checked) else Checked(c)
    out.checked = out.checked | {stage} | (set(c["stages"]) if stage == "recipe" else set())
    return out


def compose(stage: str, overrides: list[str] | None = None, checked: bool = False) -> DictConfig:
    """Compose ``conf/<stage>.yaml`` with overrides outside of ``@hydra.main`` (tests, submit);
    ``checked`` also runs the stage's value checks."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=os.path.join(REPO_DIR, "conf"), version_base=None):
        cfg = hydra_compose(config_name=stage, overrides=list(overrides or []))
    if checked:
        check(stage, cfg)
    return cfg
