"""The main job: the stages in ``cfg.stages`` in order, each handed the same composed config."""

from __future__ import annotations

from omegaconf import DictConfig

from cerbero_ray.config import PIPELINE_STAGES, to_container


def check_loads(hf_dir: str) -> str:
    """Load the exported folder as a user would; returns a one-line description."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cerbero_ray.storage import local_copy

    path = local_copy(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {n / 1e6:.1f}M parameters, tokenizer of {len(tok)} tokens with the chat template"


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
        elif stage == "train":
            from cerbero_ray.train.trainer import run_training

            results[stage] = summary = run_training(c)
            evals = summary["eval_losses"]
            print(f"\nheld-out loss: {evals[0]:.4f} -> {evals[-1]:.4f}" if evals else "")
            print(f"checkpoint: {summary['checkpoint']}\nhf model: {summary['hf_dir']}")
            print(f"from_pretrained({summary['hf_dir']!r}): {check_loads(summary['hf_dir'])}", flush=True)
        elif stage == "label":
            from cerbero_ray.label.pipeline import run_labeling

            results[stage] = run_labeling(c)
    return results
