"""The main job, the recipe: the stages in ``cfg.stages`` in the stage table's order (data, train,
label, export, evaluate), each handed the same composed config, on one Ray cluster. Before
evaluating, the run's initial weights (what training started from) are written as ``<run>/hf_init``
when an evaluation checkpoint names that folder, so the untrained and the trained model share one
table."""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from omegaconf import DictConfig

from cerbero_ray.config import check, checked_for, mark_checked
from cerbero_ray.config.recipe import RecipeConfig
from cerbero_ray.config.stages import STAGES

log = logging.getLogger(__name__)


def check_loads(folder: str) -> str:
    """Load the exported folder (an HF model, or a LoRA adapter on its base, with peft) as a user
    would; returns a one-line description."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cerbero_ray import adapters
    from cerbero_ray.storage import local_copy

    path = local_copy(folder)
    tok = AutoTokenizer.from_pretrained(path)
    if adapters.is_adapter(folder):
        from peft import PeftModel

        base = adapters.base_of(folder)
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_copy(base)), path)
        lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
        n = sum(p.numel() for p in model.parameters())
        return (
            f"PeftModel.from_pretrained: {type(model.base_model.model).__name__} + LoRA, {lora / 1e6:.3f}M of "
            f"{n / 1e6:.1f}M parameters, tokenizer of {len(tok)} tokens with the chat template"
        )
    model = AutoModelForCausalLM.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {n / 1e6:.1f}M parameters, tokenizer of {len(tok)} tokens with the chat template"


def save_initial(c: RecipeConfig) -> str:
    """The model the train stage started from (its builder and seed), as an HF folder; kept if there."""
    from cerbero_ray import storage
    from cerbero_ray.models import build_model
    from cerbero_ray.tokenizer import build_tokenizer
    from cerbero_ray.train.checkpoint import save_hf_to

    t, tc = c.train, c.tokenizer
    dest = storage.join(t.output_dir, t.name, "hf_init")
    if not storage.is_file(storage.join(dest, "tokenizer.json")):  # written last: the folder is complete
        lm = build_model(replace(c.model, dtype="float32"), seed=t.seed)
        save_hf_to(lm, build_tokenizer(tc.path, tc.assistant_tag, tc.system_line), dest)
    return dest


def _after_data(c: RecipeConfig, result: dict) -> None:
    log.info(f"\nshards: {c.data.output_dir}/shards\nmanifest: {c.data.output_dir}/manifest.json")


def _after_train(c: RecipeConfig, summary: dict) -> None:
    evals = summary["eval_losses"]
    log.info(f"\nheld-out loss: {evals[0]:.4f} -> {evals[-1]:.4f}" if evals else "")
    model = summary.get("adapter_dir") or summary["hf_dir"]
    log.info(f"checkpoint: {summary['checkpoint']}\n{'adapter' if summary.get('adapter_dir') else 'hf model'}: {model}")
    log.info(f"from_pretrained({model!r}): {check_loads(model)}")


def _before_evaluate(c: RecipeConfig) -> RecipeConfig:
    from cerbero_ray.storage import join

    if join(c.train.output_dir, c.train.name, "hf_init") in c.evaluate.checkpoints.values():
        save_initial(c)
    return c


def _before_export(c: RecipeConfig) -> RecipeConfig:
    """Without llama-cpp-python the K-quants are dropped, with one line (the f16 file is made)."""
    from cerbero_ray.export import quantize

    x = c.export
    if quantize.available() or not any(t in quantize.FTYPES for t in x.types):
        return c
    dropped = [t for t in x.types if t in quantize.FTYPES]
    log.warning(
        f"[export] {', '.join(dropped)} skipped: llama.cpp's quantizer comes with llama-cpp-python "
        "(pip install -e '.[gguf]')"
    )
    out = replace(c, export=replace(x, types=[t for t in x.types if t not in quantize.FTYPES] or ["f16"]))
    mark_checked(out, checked_for(c))  # the same config, less what cannot be made here: checked already
    return out


BEFORE = {"evaluate": _before_evaluate, "export": _before_export}  # the main job's policy, per stage
AFTER = {"data": _after_data, "train": _after_train}


def run_recipe(cfg: DictConfig | dict | RecipeConfig) -> dict:
    """Run each stage of ``stages`` on an initialised Ray; returns {stage: its result}. The config
    is checked once, here, for every stage. Last, one line: each stage's wall time."""
    c = check("recipe", cfg)
    results, took = {}, {}
    for name in c.stages:
        t0 = time.perf_counter()
        stage_cfg = BEFORE.get(name, lambda c: c)(c)
        results[name] = STAGES[name].runner()(stage_cfg)
        if name in AFTER:
            AFTER[name](c, results[name])
        took[name] = time.perf_counter() - t0
    log.info(
        f"[recipe] {len(took)} stage(s) in {_span(sum(took.values()))}: "
        + ", ".join(f"{name} {_span(s)}" for name, s in took.items())
    )
    return results


def _span(seconds: float) -> str:
    if seconds < 59.95:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s:02d} s"
