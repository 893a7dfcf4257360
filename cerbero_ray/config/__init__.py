"""Typed config schemas, composed with Hydra, checked before anything runs.

Each stage's schema and its ``check_<stage>(c)`` live in ``cerbero_ray/config/<stage>.py`` and are
declared once, with the rest of the stage, in the stage table (``config/stages.py``); they are
registered with Hydra's ConfigStore so that a misspelled or unknown key fails when the config is
composed, and :func:`check` runs the stage's value checks (a ``ValueError`` naming the key) on the
composed config, before Ray starts — in ``jobs/<stage>.py`` and in ``cerbero-submit`` alike. It
returns the stage's schema dataclass, resolved, every default filled in: what ``run_<stage>`` and
the code below it read (attributes, never ``["key"]``). Checks that must read storage (a data
manifest, a checkpoint) stay in ``run_<stage>``. Importing this package imports neither torch nor
transformers.
"""

from __future__ import annotations

import os
import re
from dataclasses import fields, is_dataclass

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cerbero_ray.config.common import ModelConfig
from cerbero_ray.config.data import SourceConfig
from cerbero_ray.config.evaluate import EvalTaskConfig
from cerbero_ray.config.stages import STAGES
from cerbero_ray.storage import SCHEMES

REPO_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
    for name, stage in STAGES.items():
        cs.store(name=f"{name}_schema", node=stage.schema)
    cs.store(group="model", name="model_schema", node=ModelConfig)
    cs.store(group="data/source", name="source_schema", node=SourceConfig)
    cs.store(group="evaluate/task", name="task_schema", node=EvalTaskConfig)


def to_container(cfg: DictConfig) -> dict:
    """The resolved config as plain dicts (what a run record or a test edits; ``check`` types it)."""
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def checked_for(cfg) -> frozenset:
    """The stages whose checks ``cfg`` (a typed config) passed in this process."""
    return getattr(cfg, "_checked_for", frozenset())


def mark_checked(cfg, stages) -> None:
    """Record that ``cfg`` passed the checks of ``stages``: checking it for one of them again is a
    no-op, so a job's config is checked once (the recipe's check covers its stages)."""
    object.__setattr__(cfg, "_checked_for", checked_for(cfg) | frozenset(stages))


def as_stage(stage: str, cfg):
    """``cfg`` (a typed config holding every section of ``stage``'s schema, e.g. the recipe's) as
    that stage's schema; its sections are shared, not copied."""
    schema = STAGES[stage].schema
    if type(cfg) is schema:
        return cfg
    out = schema(**{f.name: getattr(cfg, f.name) for f in fields(schema)})
    mark_checked(out, checked_for(cfg) & {stage})
    return out


_URI = re.compile(r"([a-z][a-z0-9+.-]*)://(.*)", re.S)


def _tidy_uris(x):
    """``x`` with every object-store URI in it written with single slashes: ``paths.output_dir=
    s3://b/run/`` makes ``s3://b/run//train``, a key no one named (pyarrow refuses it; ``aws s3 cp``
    of the printed URI finds nothing). Other schemes are left as they are: a web address (an
    endpoint), a tracker's ``sqlite:////abs/mlflow.db`` (four slashes: an absolute path)."""
    if is_dataclass(x):
        for f in fields(x):
            setattr(x, f.name, _tidy_uris(getattr(x, f.name)))
    elif isinstance(x, dict):
        for k in x:
            x[k] = _tidy_uris(x[k])
    elif isinstance(x, list):
        x[:] = [_tidy_uris(v) for v in x]
    elif isinstance(x, str) and (m := _URI.fullmatch(x)) and m[1].lower() in SCHEMES:
        return f"{m[1]}://{re.sub(r'/{2,}', '/', m[2])}"
    return x


def typed(stage: str, cfg: DictConfig | dict):
    """``cfg`` (composed, or plain dicts) as ``stage``'s schema dataclass, resolved, every default
    filled, its URIs tidied (:func:`_tidy_uris`); a key the schema lacks or a value of the wrong
    type is a ``ValueError`` naming the key."""
    if is_dataclass(cfg):
        return as_stage(stage, cfg)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(STAGES[stage].schema), cfg)
        return _tidy_uris(OmegaConf.to_object(merged))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        msg = getattr(e, "msg", None) or str(e).splitlines()[0]
        raise ValueError(f"{key}: {msg}" if key else msg) from None


def check(stage: str, cfg):
    """Run ``check_<stage>`` on the composed config (once); returns it typed: an instance of the stage's
    schema (``STAGES[stage].schema``), what ``run_<stage>`` and the code below it read."""
    c = typed(stage, cfg)
    if stage in checked_for(c):
        return c
    if getattr(c, "cluster", None) is not None:  # every stage's: the embedded cluster's settings
        from cerbero_ray.config.common import check_cluster

        check_cluster(c.cluster)
    if getattr(c, "paths", None) is not None:  # every stage's: where it reads and writes
        from cerbero_ray.config.common import check_paths

        check_paths(c.paths)
    STAGES[stage].check(c)
    mark_checked(c, {stage, *(c.stages if stage == "recipe" else ())})
    return c


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
