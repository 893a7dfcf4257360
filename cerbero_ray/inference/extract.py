"""Bulk extraction: an ``extract`` task's answer generated under its JSON schema (constrained
decoding, :mod:`cerbero_ray.inference.grammar`) on the continuous engine, greedy, then read into
one typed column per schema property (:func:`arrow_type`) plus the raw JSON. Plain PyTorch, no Ray.

A row's answer is checked twice: the grammar keeps every token inside the schema, and the finished
JSON is validated with ``jsonschema`` and converted to its columns' types. A row whose answer hit
``max_new_tokens`` before the JSON closed is an error row (``incomplete_json``), never a half-read
value; so is one that fails either check (``schema_mismatch``), which the grammar should make
impossible.
"""

from __future__ import annotations

import json
import math

import pyarrow as pa

from cerbero_ray.config.label_task import LabelTask, column_types
from cerbero_ray.inference.label_prompts import prompt_text, text_prompts
from cerbero_ray.logs import short
from cerbero_ray.tokenizer import encode_prompts

_SCALAR_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}


def arrow_type(spec) -> pa.DataType:
    """The Arrow type of a :func:`~cerbero_ray.config.label_task.column_types` entry."""
    if spec == "dictionary":
        return pa.dictionary(pa.int32(), pa.string())
    if isinstance(spec, tuple) and spec[0] == "list":
        return pa.list_(arrow_type(spec[1]))
    if isinstance(spec, tuple) and spec[0] == "struct":
        return pa.struct([(k, arrow_type(v)) for k, v in spec[1].items()])
    return _SCALAR_TYPES[spec]


def fields(task: LabelTask) -> list[tuple[str, pa.DataType]]:
    """The typed columns of ``task``'s answers, one per schema property, in the schema's order."""
    return [(k, arrow_type(t)) for k, t in column_types(task.schema).items()]


def output_fields(task: LabelTask) -> list[tuple[str, pa.DataType]]:
    """What a labeling job writes between ``id`` and ``truncated``: ``label`` and ``p_<label>`` per
    label, or (extract) a column per schema property, ``json`` (the raw answer) and ``new_tokens``."""
    if task.kind == "extract":
        return [*fields(task), ("json", pa.string()), ("new_tokens", pa.int64())]
    return [("label", pa.string()), *[(f"p_{k}", pa.float64()) for k in task.labels]]


def prompt_budget(task: LabelTask, tok, max_text_tokens: int) -> int:
    """The most prompt tokens a text of ``max_text_tokens`` tokens makes (the engine's prompt room)."""
    (frame,), _ = encode_prompts(tok, [prompt_text(task, "", tok)])
    return len(frame) + max_text_tokens + 16  # a cut text re-tokenized in its prompt may gain a few


def _finite(v) -> bool:
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, dict):
        return all(_finite(x) for x in v.values())
    if isinstance(v, list):
        return all(_finite(x) for x in v)
    return True


class Extractor:
    """Extracts ``task``'s fields from texts with one causal LM on the continuous engine (``slots``
    answers decoded together)."""

    def __init__(self, model, tok, task: LabelTask, *, max_text_tokens: int = 512, slots: int = 16):
        import jsonschema

        from cerbero_ray.inference.engines import EngineConfig, build_engine
        from cerbero_ray.inference.grammar import Matcher, grammar
        from cerbero_ray.inference.sampling import Sampling

        if task.kind != "extract":
            raise ValueError(f"task {task.name!r} is a {task.kind} task; an Extractor takes an extract task")
        self.tok, self.task, self.max_text_tokens = tok, task, max_text_tokens
        self.fields = fields(task)
        g = grammar("json_schema", task.schema)
        Matcher(tok, g)  # a schema llguidance cannot run is a ValueError here, before any row
        self.sampling = Sampling(
            max_new_tokens=task.max_new_tokens, temperature=0.0, top_p=1.0, stop=[], seed=0, grammar=g
        )
        self.validator = jsonschema.validators.validator_for(task.schema)(task.schema)
        cfg = EngineConfig("continuous", slots, prompt_budget(task, tok, max_text_tokens), task.max_new_tokens)
        self.engine = build_engine(model, tok, cfg)

    def close(self) -> None:
        self.engine.close()

    def columns(self, texts: list, errors: list[str | None] | None = None) -> dict[str, list]:
        """One list per schema property, ``json``, ``new_tokens``, ``truncated`` and ``error`` for
        each of ``texts``; rows with an error in ``errors`` get no answer."""
        errors = errors or [None] * len(texts)
        self.engine.forget()  # no prefix reused from earlier calls: a rerun chunk gives the same answers
        todo = [i for i, e in enumerate(errors) if e is None]
        prompts, cut = text_prompts(self.task, self.tok, [texts[i] for i in todo], self.max_text_tokens)
        results = dict(zip(todo, self.engine.run([(p, self.sampling) for p in prompts]) if prompts else []))
        truncated = dict(zip(todo, cut))
        cols: dict[str, list] = {k: [] for k, _ in self.fields}
        cols.update(json=[], new_tokens=[], truncated=[], error=[])
        for i, e in enumerate(errors):
            g = results.get(i)
            values, raw = None, None
            if g is not None:
                raw = g["text"]
                values, e = self.read(g)
            for k, _ in self.fields:
                cols[k].append(values.get(k) if values is not None else None)
            cols["json"].append(raw)
            cols["new_tokens"].append(g["new_tokens"] if g else None)
            cols["truncated"].append(bool(truncated.get(i)))
            cols["error"].append(e)
        return cols

    def read(self, g: dict) -> tuple[dict | None, str | None]:
        """An answer's values, or why it has none."""
        if g.get("constraint") != "complete":
            return None, f"incomplete_json: the answer reached max_new_tokens={self.task.max_new_tokens} unclosed"
        try:
            values = json.loads(g["text"])
        except ValueError as x:
            return None, f"schema_mismatch: not JSON ({short(str(x))})"
        first = next(iter(self.validator.iter_errors(values)), None)
        if first is not None:
            return None, f"schema_mismatch: {short(first.message)}"
        if not _finite(values):  # 7e707 parses as inf: no float64 holds it
            return None, "schema_mismatch: a number beyond float64's range"
        for k, t in self.fields:
            try:
                pa.array([values.get(k)], type=t)
            except (pa.ArrowException, TypeError, ValueError) as x:
                return None, f"schema_mismatch: {k[:64]}: {short(str(x))}"
        return values, None
