"""Labeling tasks: an Italian instruction, labels with verbalizers, optional few-shot examples.

A task becomes one chat per text, in the cerbero format every stage shares:

    <s>{system line}
    [|Umano|] {instruction}\\n\\nTesto: {example text}\\n\\nRispondi con una sola di queste opzioni: …
    [|AI|] {example verbalizer}
    …
    [|Umano|] {instruction}\\n\\nTesto: {text}\\n\\nRispondi con una sola di queste opzioni: …
    [|AI|]

and each label's *continuation* is its verbalizer as the assistant's whole answer (`` Positivo\\n</s>``):
scoring the end of turn too keeps a label from winning because it is a prefix of a longer answer.

An ``extract`` task asks for a JSON object instead of the options (``Rispondi solo con un oggetto
JSON con i campi: …``, each field with its schema's ``description``); a few-shot example's answer is
its ``output`` as compact JSON, the form the constrained answer takes.
"""

from __future__ import annotations

import hashlib
import json
import re

from cerbero_ray.config.label_task import LabelTask, get_task, resolve_task

__all__ = [
    "LabelTask",
    "get_task",
    "resolve_task",
    "messages",
    "prompt_text",
    "text_prompts",
    "continuations",
    "prompt_hash",
]
TEXT_SLOT = "\x00TESTO\x00"


def _question(task: LabelTask, text: str) -> str:
    if task.template is not None:  # the instruction only where the template says {instruction}
        slots = {"{text}": text, "{instruction}": task.instruction}
        return re.sub(r"\{text\}|\{instruction\}", lambda m: slots[m[0]], task.template)  # one pass
    if task.kind == "extract":
        fields = ", ".join(
            f"{k} ({p['description']})" if isinstance(p, dict) and p.get("description") else k
            for k, p in task.schema["properties"].items()
        )
        return f"{task.instruction}\n\nTesto: {text}\n\nRispondi solo con un oggetto JSON con i campi: {fields}."
    options = ", ".join(task.labels.values())
    return f"{task.instruction}\n\nTesto: {text}\n\nRispondi con una sola di queste opzioni: {options}."


def answer(task: LabelTask, example: dict) -> str:
    """A few-shot example's answer: its label's verbalizer, or (extract) its output as compact JSON."""
    if task.kind == "extract":
        return json.dumps(example["output"], ensure_ascii=False, separators=(",", ":"))
    return task.labels[example["label"]]


def messages(task: LabelTask, text: str) -> list[dict]:
    out = []
    for ex in task.few_shot:
        out += [
            {"role": "user", "content": _question(task, ex["text"])},
            {"role": "assistant", "content": answer(task, ex)},
        ]
    return out + [{"role": "user", "content": _question(task, text)}]


def prompt_text(task: LabelTask, text: str, tok) -> str:
    """The rendered prompt, ending with the assistant tag."""
    return tok.apply_chat_template(messages(task, text), tokenize=False, add_generation_prompt=True)


def text_prompts(task: LabelTask, tok, texts: list[str], max_text_tokens: int) -> tuple[list[str], list[bool]]:
    """Each text's rendered prompt, and whether the text was cut: a text over ``max_text_tokens``
    keeps its first tokens. Only a text's head is tokenized (:func:`~cerbero_ray.tokenizer.text_head`):
    a row of 10 MB took 10 s and 0.9 GB to tokenize whole, and one of 100 MB would stall or kill its
    actor."""
    from cerbero_ray.tokenizer import encode_plain, text_head

    ids = encode_plain(tok, [text_head(x, max_text_tokens, tok) for x in texts])
    cut = [len(t) > max_text_tokens for t in ids]
    kept = [tok.decode(t[:max_text_tokens]) if c else x for x, t, c in zip(texts, ids, cut)]
    return [prompt_text(task, x, tok) for x in kept], cut


def continuations(task: LabelTask, tok) -> dict[str, list[int]]:
    """Each label's continuation token ids after the prompt (verbalizer + end of turn)."""
    from cerbero_ray.tokenizer import encode_chats, encode_prompts

    msgs = messages(task, "x")
    (prompt,), _ = encode_prompts(tok, [prompt_text(task, "x", tok)])
    out = {}
    for label, verb in task.labels.items():
        (full,), _ = encode_chats(tok, [msgs + [{"role": "assistant", "content": verb}]])
        if full[: len(prompt)] != prompt:
            raise ValueError(f"label.task.labels.{label}: the verbalizer {verb!r} changes how the prompt tokenizes")
        out[label] = full[len(prompt) :]
    return out


def prompt_hash(task: LabelTask, tok) -> str:
    """Identifies the exact prompts and continuations (task + chat template + tokenizer)."""
    blob = json.dumps(
        {
            "task": task.identity(),
            "template": prompt_text(task, TEXT_SLOT, tok),
            "continuations": continuations(task, tok),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
