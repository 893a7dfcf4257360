"""A labeling task (the ``label.task`` schema, and ``serve.label_tasks``): an Italian instruction,
labels with their verbalizers, optional few-shot examples, an optional template. Validated when
made, so a malformed task is a ``ValueError`` naming its key at compose time. How a task becomes
prompts and label continuations is :mod:`cerbero_ray.inference.label_prompts`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, is_dataclass

import yaml

from cerbero_ray.logs import short

TASK_KEYS = {"name", "instruction", "labels", "few_shot", "template"}


MAX_NAME_CHARS = 64  # a label's name: a column value and a key of every result's probs
MAX_VERBALIZER_CHARS = 256  # a label's verbalizer: scored as a continuation of every text


@dataclass(frozen=True)
class LabelTask:
    name: str
    instruction: str
    labels: dict[str, str]  # label -> verbalizer
    few_shot: list[dict] = field(default_factory=list)
    # the human's turn, with ``{text}`` where the text goes and ``{instruction}`` where the instruction
    # goes (a template without it leaves the instruction out of the prompt); None: the instruction,
    # the text and the options
    template: str | None = None

    def __post_init__(self):
        if not self.name.strip() or not self.instruction.strip():
            raise ValueError("label.task: name and instruction are required (and not blank)")
        if self.template is not None and "{text}" not in self.template:
            raise ValueError(f"label.task.template must hold {{text}}, got {short(self.template)}")
        if len(self.labels) < 2:
            raise ValueError(f"label.task.labels: at least two labels, got {short(list(self.labels))}")
        _check_labels(self.labels)
        for ex in self.few_shot:
            if set(ex) != {"text", "label"} or ex["label"] not in self.labels:
                raise ValueError(
                    f"label.task.few_shot: each example is {{text, label}} with a known label, got {short(ex)}"
                )


def _check_labels(labels: dict[str, str]) -> None:
    """Names non-blank, at most :data:`MAX_NAME_CHARS`, distinct once case and surrounding spaces are
    set aside; verbalizers non-blank, at most :data:`MAX_VERBALIZER_CHARS`, distinct."""
    names, verbs = {}, {}
    for name, verb in labels.items():
        if not name.strip():
            raise ValueError(f"label.task.labels: a label name is empty or blank ({short(name)})")
        if len(name) > MAX_NAME_CHARS:
            raise ValueError(
                f"label.task.labels: the name {short(name)} has {len(name):,} characters; at most {MAX_NAME_CHARS}"
            )
        if not verb.strip():
            raise ValueError(f"label.task.labels: verbalizers must be non-empty and distinct; {short(name)}'s is blank")
        if len(verb) > MAX_VERBALIZER_CHARS:
            raise ValueError(
                f"label.task.labels.{short(name)}: the verbalizer has {len(verb):,} characters; "
                f"at most {MAX_VERBALIZER_CHARS}"
            )
        same = names.setdefault(name.strip().casefold(), name)
        if same != name:
            raise ValueError(
                f"label.task.labels: {short(same)} and {short(name)} are one label (case and spaces aside)"
            )
        twin = verbs.setdefault(verb.strip(), name)
        if twin != name:
            raise ValueError(
                f"label.task.labels: verbalizers must be non-empty and distinct; {short(twin)} and {short(name)} "
                f"have the same verbalizer {short(verb.strip())}"
            )


def task_from_dict(d) -> LabelTask:
    """A task from a mapping of task keys, or a ``LabelTaskConfig`` (the ``label.task`` schema)."""
    if is_dataclass(d):
        d = asdict(d)
    unknown = set(d) - TASK_KEYS
    if unknown:
        raise ValueError(f"label.task: unknown keys {sorted(unknown)}; allowed {sorted(TASK_KEYS)}")
    return LabelTask(
        d.get("name", ""),
        d.get("instruction", ""),
        {str(k): str(v) for k, v in (d.get("labels") or {}).items()},
        [dict(x) for x in d.get("few_shot") or []],
        d.get("template"),
    )


def load_task(path: str) -> LabelTask:
    """A task from a user's YAML file (the same keys as ``conf/label/task/*.yaml``)."""
    with open(path) as f:
        d = yaml.safe_load(f)
    if not isinstance(d, dict):
        raise ValueError(f"label.task_file: {path} holds no mapping of task keys")
    return task_from_dict(d)


def resolve_task(lc) -> LabelTask:
    """The task of a ``label`` config section: ``task_file`` when set, else ``task``."""
    return load_task(lc.task_file) if lc.task_file else task_from_dict(lc.task)


def get_task(spec) -> LabelTask:
    """A :class:`LabelTask` from a LabelTask, a dict of task keys, a YAML file, or the name of a shipped task
    (``sentiment``, ``toxicity``, ``irony``: ``conf/label/task/<name>.yaml``)."""
    if isinstance(spec, LabelTask):
        return spec
    if isinstance(spec, dict):
        return task_from_dict(spec)
    shipped = os.path.join(os.path.dirname(__file__), "..", "..", "conf", "label", "task", f"{spec}.yaml")
    if os.path.isfile(shipped):
        return load_task(shipped)
    if os.path.isfile(spec):
        return load_task(spec)
    raise ValueError(f"task {spec!r}: not a shipped task, nor a YAML file")
