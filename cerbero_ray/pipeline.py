"""The main job: the stages in ``cfg.stages`` in order, each handed the same composed config."""

from __future__ import annotations

from omegaconf import DictConfig

from cerbero_ray.config import PIPELINE_STAGES, to_container


def run_pipeline(cfg: DictConfig) -> dict:
    """Run each stage; returns {stage: its result}. Stages not yet built are a clear error."""
    unknown = [s for s in cfg.stages if s not in PIPELINE_STAGES]
    if unknown:
        raise ValueError(f"stages: unknown {unknown}; available: {list(PIPELINE_STAGES)}")
    c = to_container(cfg)
    results = {}
    for stage in cfg.stages:
        if stage == "prepare_data":
            from cerbero_ray.data.pipeline import run_data

            results[stage] = run_data(c)
            print(f"\nshards: {c['data']['output_dir']}/shards\nmanifest: {c['data']['output_dir']}/manifest.json")
    return results
