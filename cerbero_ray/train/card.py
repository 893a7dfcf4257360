"""The model card (``README.md``) of a trained model folder, as the Hugging Face Hub reads it: its
metadata (``huggingface_hub.ModelCardData``: language, license, base model, library, tags; what the
run cannot know comes from ``train.card``) and what a reader needs to use the model and to judge it:
the chat format, how to load it, how it was trained (method, data, steps, settings) and where its
losses went. Rank 0 writes it into ``hf/`` and ``adapter/`` with the model, before the folder's
complete marker."""

from __future__ import annotations

import json

from cerbero_ray.cards import CARD, RECORD, chat_and_use, data_checks, data_record, front_matter  # noqa: F401 (CARD: the folder's card, named here too)
from cerbero_ray.chat import STOP_STRING

EXAMPLE = [{"role": "user", "content": "Ciao! Come stai?"}]


def _n(x: float) -> str:
    """A count in the card: 4,718,592 → 4.7M; 33,524 → 33.5K."""
    for size, unit in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if x >= size:
            return f"{x / size:.1f}{unit}"
    return f"{x:g}"


def _loss(v) -> str:
    return f"{v:.4f}" if isinstance(v, (int, float)) else "–"


def card_text(config, summary: dict, manifest: dict | None, prompt: str, kind: str = "hf") -> str:
    """The card of the model folder ``kind`` (``hf``: the full model, or the base with the adapter
    merged in; ``adapter``: a peft adapter folder) of a finished run: ``config`` the run's
    ``TrainStageConfig``, ``summary`` what ``summary.json`` holds, ``manifest`` the data stage's
    (None: not readable), ``prompt`` the chat template applied to :data:`EXAMPLE`."""
    from cerbero_ray.train.zero import learning_rate  # the optimizer's, a LoRA run's own when set

    t, lora = config.train, config.train.method == "lora"
    tags = ["cerbero-ray", "italian", "mistral", "conversational", "lora" if lora else "full-fine-tune"]
    meta = dict(
        language=["it"],
        license=t.card.license,
        library_name="peft" if kind == "adapter" else "transformers",
        pipeline_tag="text-generation",
        base_model=t.card.base_model,
        tags=tags,
    )
    if record := data_record((manifest or {}).get("dedup")):  # the evaluate stage reads it, wherever the folder goes
        meta[RECORD] = record
    builder = config.model._target_.rsplit(".", 1)[-1]
    base = config.model.path or f"a random-init `{builder}` (not a language model: a demo)"
    if lora:
        what = f"a LoRA adapter (rank {t.lora.r}, alpha {t.lora.alpha:g}) on {base}"
        what += ", merged into its base" if kind == "hf" else ""
    else:
        what = f"a full fine-tune of {base}"
    m = manifest or {}
    docs = m.get("documents_by_source") or {}
    sources = ", ".join(f"`{k}` ({v:,})" for k, v in docs.items()) or "–"
    intro = (
        f"Turns are tagged as the tokenizer's chat template writes them; the model ends its turn with `{STOP_STRING}` "
        "(stop there):"
    )
    lines = [
        *front_matter(**meta),
        f"# {t.name}",
        "",
        f"An Italian chat model (Mistral architecture, {_n(summary.get('total_params') or 0)} parameters): {what}, "
        "trained with cerbero-ray: the cerbero-7b recipe (a full fine-tune of "
        "mistral-7b on Italian conversations, DeepSpeed ZeRO-1, one epoch) as Ray jobs.",
        "",
        *_checkpoint_note(summary, kind),
        *chat_and_use(intro, prompt, _usage(kind, summary)),
        "llama.cpp: cerbero-ray's `python jobs/export.py export.checkpoint=<this folder>` writes GGUF files "
        "(f16 and q4_k_m by default) and has llama.cpp check each against transformers.",
        "",
        "## Training",
        "",
        "| | |",
        "|---|---|",
        f"| method | {_method(config)} |",
        f"| data | {m.get('documents', 0):,} documents ({sources}) packed into {m.get('rows', 0):,} rows of "
        f"{m.get('seq_len', '?')} tokens; {_n(m.get('tokens', 0))} tokens, loss on the {m.get('loss_on', '?')} "
        f"turns ({_n(m.get('loss_tokens', 0))} tokens) |",
        *data_checks(m.get("dedup")),
        f"| steps | {_steps(summary.get('steps') or 0, t, m.get('rows'))} |",
        f"| optimizer | AdamW, lr {learning_rate(t):g}, {t.schedule} to {t.min_lr_ratio:g}×, "
        f"weight decay {t.weight_decay:g}, betas {tuple(t.betas)}, gradient clip {t.max_grad_norm:g} |",
        f"| precision | {t.precision} |",
        f"| workers | {t.num_workers} × {'GPU' if t.use_gpu else 'CPU'} |",
        f"| time | {summary.get('train_s', 0):.0f} s of steps; median {summary.get('tokens_per_s_median') or 0:,.0f} "
        "tokens/s |",
        "",
        "## Losses",
        "",
        "| | first | last |",
        "|---|---|---|",
        f"| training | {_loss(summary.get('first_loss'))} | {_loss(summary.get('final_loss'))} |",
    ]
    held = summary.get("eval_losses") or []
    if held:
        lines.append(f"| held-out ({t.eval_rows} rows never trained on) | {_loss(held[0])} | {_loss(held[-1])} |")
    lines += [
        "",
        "Benchmarks (SQuAD-it, EVALITA): `python jobs/evaluate.py` with this folder among `evaluate.checkpoints`.",
        "",
    ]
    if t.card.license is None:
        lines += [
            "License: not set (`train.card.license`): the base model's terms and each data source's decide it.",
            "",
        ]
    return "\n".join(lines)


def _checkpoint_note(summary: dict, kind: str) -> list[str]:
    """A checkpoint's folder says so: the figures below are the run's so far."""
    steps, total = summary.get("steps") or 0, summary.get("total_steps")
    if not total or steps >= total:
        return []
    return [
        f"**A checkpoint at step {steps} of {total}**: the training and losses below are the run's so far; "
        f"its final model is written to the run's `{kind}/` folder.",
        "",
    ]


def _steps(steps: int, t, rows: int | None) -> str:
    """The steps, their rows, and the epochs they make of the rows trained on."""
    seen = steps * t.global_batch_size
    left = (rows or 0) - t.eval_rows
    epochs = f" = {seen / left:.2f} epoch(s) of the {left:,} trained on" if left > 0 else ""
    return f"{steps} × {t.global_batch_size} rows ({seen:,} rows{epochs})"


def _method(config) -> str:
    t, ds = config.train, config.deepspeed
    if t.method == "lora":
        lc = t.lora
        full = f"; trained in full: {', '.join(lc.train_in_full)}" if lc.train_in_full else ""
        return f"LoRA r={lc.r}, alpha={lc.alpha:g}, dropout {lc.dropout:g} on {', '.join(lc.target_modules)}{full}"
    engine = f"DeepSpeed ZeRO-{ds.stage}" if t.strategy == "deepspeed" else "PyTorch ZeRO-1 (ZeroRedundancyOptimizer)"
    return f"full fine-tune, {engine}"


def _usage(kind: str, summary: dict) -> list[str]:
    """Code that loads the folder and answers :data:`EXAMPLE` (tests run it on a tiny model)."""
    load = [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "."  # this folder',
        "tok = AutoTokenizer.from_pretrained(path)",
    ]
    if kind == "adapter":
        load += [
            "from peft import PeftModel",
            "",
            f"base = {json.dumps(summary.get('base') or '<the base model>')}  # the base it was trained on",
            'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), path)',
        ]
    else:
        load.append('model = AutoModelForCausalLM.from_pretrained(path, dtype="auto")')
    return load + [
        f"messages = {json.dumps(EXAMPLE, ensure_ascii=False)}",
        "text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)",
        'ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids',
        f"out = model.generate(ids, max_new_tokens=64, stop_strings=[{json.dumps(STOP_STRING)}], tokenizer=tok)",
        "print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))",
    ]
