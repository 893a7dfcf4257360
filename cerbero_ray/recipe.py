"""The main job, the recipe: the stages in ``cfg.stages`` in order (data, train, label, evaluate, export),
each handed the same composed config, on one Ray cluster. Before evaluating, the run's initial
weights (what training started from) are written as ``<run>/hf_init`` when an evaluation
checkpoint names that folder, so the untrained and the trained model share one table."""

from __future__ import annotations

from omegaconf import DictConfig

from cerbero_ray.config import check


def check_loads(hf_dir: str) -> str:
    """Load the exported folder as a user would; returns a one-line description."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cerbero_ray.storage import local_copy

    path = local_copy(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    return f"{type(model).__name__}, {n / 1e6:.1f}M parameters, tokenizer of {len(tok)} tokens with the chat template"


def save_initial(c: dict) -> str:
    """The model the train stage started from (its builder and seed), as an HF folder; kept if there."""
    from cerbero_ray import storage
    from cerbero_ray.models import build_model
    from cerbero_ray.tokenizer import build_tokenizer
    from cerbero_ray.train.checkpoint import save_hf_to

    t, tc = c["train"], c["tokenizer"]
    dest = storage.join(t["output_dir"], t["name"], "hf_init")
    if not storage.is_file(storage.join(dest, "tokenizer.json")):  # written last: the folder is complete
        lm = build_model({**c["model"], "dtype": "float32"}, seed=t["seed"])
        save_hf_to(lm, build_tokenizer(tc.get("path"), tc["assistant_tag"], tc["system_line"]), dest)
    return dest


def run_recipe(cfg: DictConfig | dict) -> dict:
    """Run each stage on an initialised Ray; returns {stage: its result}."""
    c = check("recipe", cfg)
    results = {}
    for stage in c["stages"]:
        if stage == "data":
            from cerbero_ray.data import run_data

            results[stage] = run_data(c)
            print(f"\nshards: {c['data']['output_dir']}/shards\nmanifest: {c['data']['output_dir']}/manifest.json")
        elif stage == "train":
            from cerbero_ray.train import run_train

            results[stage] = summary = run_train(c)
            evals = summary["eval_losses"]
            print(f"\nheld-out loss: {evals[0]:.4f} -> {evals[-1]:.4f}" if evals else "")
            print(f"checkpoint: {summary['checkpoint']}\nhf model: {summary['hf_dir']}")
            print(f"from_pretrained({summary['hf_dir']!r}): {check_loads(summary['hf_dir'])}", flush=True)
        elif stage == "label":
            from cerbero_ray.label import run_label

            results[stage] = run_label(c)
        elif stage == "evaluate":
            from cerbero_ray.evaluate import run_evaluate
            from cerbero_ray.storage import join

            init = join(c["train"]["output_dir"], c["train"]["name"], "hf_init")
            if init in c["evaluate"]["checkpoints"].values():
                save_initial(c)
            results[stage] = run_evaluate(c)
        elif stage == "export":
            from cerbero_ray.export import quantize, run_export

            x = c["export"]
            if not quantize.available() and any(t in quantize.FTYPES for t in x["types"]):
                dropped = [t for t in x["types"] if t in quantize.FTYPES]
                x = {**x, "types": [t for t in x["types"] if t not in quantize.FTYPES] or ["f16"]}
                print(
                    f"[export] {', '.join(dropped)} skipped: llama.cpp's quantizer comes with llama-cpp-python "
                    "(pip install -e '.[gguf]')"
                )
            results[stage] = run_export({**c, "export": x})
    return results
