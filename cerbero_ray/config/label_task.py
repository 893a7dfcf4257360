"""A labeling task (the ``label.task`` schema, and ``serve.label_tasks``): an Italian instruction,
optional few-shot examples, an optional template, and either

- ``kind: classify`` (the default): labels with their verbalizers, each scored; or
- ``kind: extract``: a JSON schema the answer must follow (constrained decoding), written as one
  typed Parquet column per property (:func:`column_types`).

Validated when made, so a malformed task is a ``ValueError`` naming its key at compose time. How a
task becomes prompts and label continuations is :mod:`cerbero_ray.inference.label_prompts`."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, is_dataclass

import yaml

from cerbero_ray.config.constraint import plain
from cerbero_ray.logs import short

TASK_KEYS = {"name", "instruction", "labels", "few_shot", "template", "kind", "schema", "max_new_tokens"}
KINDS = ("classify", "extract")
# the extract job's own columns: a schema property of one of these names would collide with them
RESERVED_COLUMNS = ("id", "json", "new_tokens", "truncated", "error", "task", "model", "prompt_hash")
MAX_EXTRACT_TOKENS = 4096


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
    kind: str = "classify"  # classify: score the labels; extract: generate JSON under `schema`
    schema: dict | None = None  # extract: a JSON schema of an object (its properties become columns)
    max_new_tokens: int = 256  # extract: the answer's token budget (a longer one is an error row)

    def __post_init__(self):
        if not self.name.strip() or not self.instruction.strip():
            raise ValueError("label.task: name and instruction are required (and not blank)")
        if self.template is not None and "{text}" not in self.template:
            raise ValueError(f"label.task.template must hold {{text}}, got {short(self.template)}")
        if self.kind not in KINDS:
            raise ValueError(f"label.task.kind must be one of {KINDS}, got {short(self.kind)}")
        if self.kind == "extract":
            _check_extract(self)
            return
        if self.schema is not None:
            raise ValueError("label.task.schema is for kind: extract (a classify task has labels)")
        if len(self.labels) < 2:
            raise ValueError(f"label.task.labels: at least two labels, got {short(list(self.labels))}")
        _check_labels(self.labels)
        for ex in self.few_shot:
            if set(ex) != {"text", "label"} or ex["label"] not in self.labels:
                raise ValueError(
                    f"label.task.few_shot: each example is {{text, label}} with a known label, got {short(ex)}"
                )

    def keys(self) -> dict:
        """The task as its YAML keys (what ``task_from_dict`` and ``/v1/label``'s inline task read); a
        classify task without the extract keys, so it is what it was before extract tasks came."""
        d = {"name": self.name, "instruction": self.instruction, "labels": dict(self.labels)}
        d |= {"few_shot": [dict(x) for x in self.few_shot], "template": self.template}
        if self.kind != "classify":
            d |= {"kind": self.kind, "schema": self.schema, "max_new_tokens": self.max_new_tokens}
        return d

    def identity(self) -> list:
        """What fixes the task's prompts and answers (a classify task's stays what it was before
        extract tasks came, so earlier runs still match)."""
        out = [self.name, self.instruction, self.labels, self.few_shot]
        out += [self.template] if self.template is not None else []
        return out + ([self.kind, self.schema, self.max_new_tokens] if self.kind != "classify" else [])


def _check_extract(t: LabelTask) -> None:
    if t.labels:
        raise ValueError("label.task.labels: an extract task has a schema, not labels")
    if not isinstance(t.schema, dict) or not t.schema:
        raise ValueError("label.task.schema: an extract task needs a JSON schema (a mapping)")
    if not 1 <= int(t.max_new_tokens) <= MAX_EXTRACT_TOKENS:
        raise ValueError(f"label.task.max_new_tokens must be within 1..{MAX_EXTRACT_TOKENS}, got {t.max_new_tokens}")
    import jsonschema

    validator = jsonschema.validators.validator_for(t.schema)
    try:
        validator.check_schema(t.schema)
    except jsonschema.SchemaError as e:
        raise ValueError(f"label.task.schema is not a valid JSON schema: {short(e.message)}") from None
    column_types(t.schema)
    from cerbero_ray.config.constraint import check

    check("json_schema", t.schema, "label.task.schema")
    for ex in t.few_shot:
        if set(ex) != {"text", "output"} or not isinstance(ex["output"], dict):
            raise ValueError(
                f"label.task.few_shot: each example of an extract task is {{text, output}}, got {short(ex)}"
            )
        problem = validator(t.schema).iter_errors(ex["output"])
        first = next(iter(sorted(problem, key=lambda e: list(e.path))), None)
        if first is not None:
            raise ValueError(f"label.task.few_shot: an example's output breaks the schema: {short(first.message)}")


_SCALARS = {"string": "string", "integer": "int64", "number": "float64", "boolean": "bool"}


def column_types(schema: dict) -> dict[str, object]:
    """{property: its column type} for an extract task's schema: ``"string"``, ``"int64"``,
    ``"float64"``, ``"bool"``, ``"dictionary"`` (a string enum), ``("list", t)`` (an array of
    ``items``), ``("struct", {name: t})`` (an object of ``properties``); a type with ``"null"`` beside
    it (``type: [string, "null"]``, or ``anyOf`` of one type and null) is that type. ``ValueError``
    naming the property whose schema has no single column type."""
    if schema.get("type") != "object" or not isinstance(schema.get("properties"), dict) or not schema["properties"]:
        raise ValueError("label.task.schema: the top level must be {type: object, properties: {…}} (one column each)")
    props = schema["properties"]
    clash = sorted(set(props) & set(RESERVED_COLUMNS))
    if clash:
        raise ValueError(f"label.task.schema: properties {clash} would collide with the job's own columns")
    return {name: _column_type(p, f"label.task.schema.properties.{name[:64]}") for name, p in props.items()}


def _column_type(p, where: str):
    if not isinstance(p, dict):
        raise ValueError(f"{where}: a property's schema must be a mapping")
    for key in ("anyOf", "oneOf"):
        if key in p:
            kept = [x for x in p[key] if not (isinstance(x, dict) and x.get("type") == "null")]
            if len(kept) != 1:
                raise ValueError(f"{where}: {key} of several types has no single column type; give it one type")
            return _column_type(kept[0], where)
    t = p.get("type")
    if isinstance(t, list):
        kept = [x for x in t if x != "null"]
        if len(kept) != 1:
            raise ValueError(f"{where}: type {short(t)} has no single column type; give it one type (null aside)")
        t = kept[0]
    if t is None and "enum" in p:
        t = "string" if all(isinstance(v, str) for v in p["enum"]) else None
    if t is None and isinstance(p.get("const"), str):
        t = "string"
    if t == "string":
        return "dictionary" if "enum" in p else "string"
    if t in _SCALARS:
        return _SCALARS[t]
    if t == "array":
        if not isinstance(p.get("items"), dict):
            raise ValueError(f"{where}: an array needs one `items` schema")
        return ("list", _column_type(p["items"], f"{where}.items"))
    if t == "object":
        inner = p.get("properties")
        if not isinstance(inner, dict) or not inner:
            raise ValueError(f"{where}: an object needs `properties` (its fields become a struct's)")
        return ("struct", {k: _column_type(v, f"{where}.{k[:64]}") for k, v in inner.items()})
    raise ValueError(
        f"{where}: no column type for {short(t if t is not None else p)}; use one of "
        "string, integer, number, boolean, array, object, a string enum"
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
        [dict(plain(x)) for x in d.get("few_shot") or []],
        d.get("template"),
        d.get("kind") or "classify",
        plain(d.get("schema")),
        int(256 if d.get("max_new_tokens") is None else d["max_new_tokens"]),
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
