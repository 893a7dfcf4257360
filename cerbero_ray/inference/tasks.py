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
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import yaml

TEXT_SLOT = "\x00TESTO\x00"
TASK_KEYS = {"name", "instruction", "labels", "few_shot", "template"}


@dataclass(frozen=True)
class Task:
    name: str
    instruction: str
    labels: dict[str, str]  # label -> verbalizer
    few_shot: list[dict] = field(default_factory=list)
    # the human's turn, with ``{text}`` where the text goes; None: the instruction, the text and the options
    template: str | None = None

    def __post_init__(self):
        if not self.name or not self.instruction:
            raise ValueError("label.task: name and instruction are required")
        if self.template is not None and "{text}" not in self.template:
            raise ValueError(f"label.task.template must hold {{text}}, got {self.template!r}")
        if len(self.labels) < 2:
            raise ValueError(f"label.task.labels: at least two labels, got {list(self.labels)}")
        verbs = [v.strip() for v in self.labels.values()]
        if any(not v for v in verbs) or len(set(verbs)) != len(verbs):
            raise ValueError(f"label.task.labels: verbalizers must be non-empty and distinct, got {self.labels}")
        for ex in self.few_shot:
            if set(ex) != {"text", "label"} or ex["label"] not in self.labels:
                raise ValueError(f"label.task.few_shot: each example is {{text, label}} with a known label, got {ex}")


def task_from_dict(d: dict) -> Task:
    unknown = set(d) - TASK_KEYS
    if unknown:
        raise ValueError(f"label.task: unknown keys {sorted(unknown)}; allowed {sorted(TASK_KEYS)}")
    return Task(
        d.get("name", ""),
        d.get("instruction", ""),
        {str(k): str(v) for k, v in (d.get("labels") or {}).items()},
        [dict(x) for x in d.get("few_shot") or []],
        d.get("template"),
    )


def load_task(path: str) -> Task:
    """A task from a user's YAML file (the same keys as ``conf/label/task/*.yaml``)."""
    with open(path) as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict):
        raise ValueError(f"label.task_file: {path} holds no mapping of task keys")
    return task_from_dict(d)


def resolve_task(lc: dict) -> Task:
    """The task of a ``label`` config section: ``task_file`` when set, else ``task``."""
    return load_task(lc["task_file"]) if lc.get("task_file") else task_from_dict(lc["task"])


def get_task(spec) -> Task:
    """A :class:`Task` from a Task, a dict of task keys, a YAML file, or the name of a shipped task
    (``sentiment``, ``toxicity``, ``irony``: ``conf/label/task/<name>.yaml``)."""
    if isinstance(spec, Task):
        return spec
    if isinstance(spec, dict):
        return task_from_dict(spec)
    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "label", "task", f"{spec}.yaml")
    if os.path.isfile(shipped):
        return load_task(shipped)
    if os.path.isfile(spec):
        return load_task(spec)
    raise ValueError(f"task {spec!r}: not a shipped task, nor a YAML file")


def _question(task: Task, text: str) -> str:
    if task.template is not None:
        return task.template.replace("{text}", text)
    options = ", ".join(task.labels.values())
    return f"{task.instruction}\n\nTesto: {text}\n\nRispondi con una sola di queste opzioni: {options}."


def messages(task: Task, text: str) -> list[dict]:
    out = []
    for ex in task.few_shot:
        out += [
            {"role": "user", "content": _question(task, ex["text"])},
            {"role": "assistant", "content": task.labels[ex["label"]]},
        ]
    return out + [{"role": "user", "content": _question(task, text)}]


def prompt_text(task: Task, text: str, tok) -> str:
    """The rendered prompt, ending with the assistant tag."""
    return tok.apply_chat_template(messages(task, text), tokenize=False, add_generation_prompt=True)


def continuations(task: Task, tok) -> dict[str, list[int]]:
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


def prompt_hash(task: Task, tok) -> str:
    """Identifies the exact prompts and continuations (task + chat template + tokenizer)."""
    blob = json.dumps(
        {
            "task": [task.name, task.instruction, task.labels, task.few_shot]
            + ([task.template] if task.template is not None else []),
            "template": prompt_text(task, TEXT_SLOT, tok),
            "continuations": continuations(task, tok),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
