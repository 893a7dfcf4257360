"""Constraints on generated text, as configs and users name them, and the llguidance grammars
they become (the engines apply them: :mod:`cerbero_ray.inference.grammar`). A constraint is
``(kind, value)``:

- ``("json_schema", schema)``: a JSON object valid under ``schema`` (a dict);
- ``("json_object", None)``: any JSON object;
- ``("regex", pattern)``: text matching the whole pattern;
- ``("choice", [str, …])``: exactly one of the strings.

Every grammar allows one space before the constrained text: the cerbero chat answers after
``[|AI|]`` with a space, so a trained model's first token is ``▁si`` or ``▁{``, not ``si`` or
``{``; without it a constraint would force the model into a tokenization it never saw. Answers are
stripped, as every answer is. :func:`grammar` compiles once per process; :func:`check` also asks
llguidance whether it can follow the grammar (a look-around in a regex, say, it cannot), so a
config names the problem before Ray starts.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import Any, Optional

KINDS = ("json_schema", "json_object", "regex", "choice")


@dataclass
class ConstraintConfig:
    kind: Optional[str] = None  # json_schema | json_object | regex | choice; null: free text
    value: Any = None  # json_schema: the schema (a mapping); regex: the pattern; choice: the list of strings


def llg(*submodules: str):
    """llguidance, with its ``submodules`` (``hf``, ``torch``) imported; without it, a ValueError:
    a constraint is refused, never ignored."""
    import importlib

    try:
        for name in ("llguidance", *(f"llguidance.{s}" for s in submodules)):
            importlib.import_module(name)
    except ImportError as e:
        raise ValueError("constrained decoding needs llguidance (pip install llguidance)") from e
    return importlib.import_module("llguidance")


@functools.lru_cache(maxsize=1024)
def _compiled(kind: str, value: str) -> str:
    M = llg().LLMatcher
    if kind in ("json_schema", "json_object"):
        schema = json.loads(value) if kind == "json_schema" else {"type": "object"}
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be an object")
        own = dict(schema.get("x-guidance") or {})  # llguidance's options, a schema may set its own
        schema = {**schema, "x-guidance": {"whitespace_flexible": False, **own}}
        return M.grammar_from_lark(f'start: " "? %json {json.dumps(schema, ensure_ascii=False)}')
    if kind == "regex":
        if not isinstance(value, str) or not value:
            raise ValueError("a regex constraint needs a non-empty pattern")
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"invalid regular expression: {e}") from None
        return M.grammar_from_regex(f" ?(?:{value})")
    choices = json.loads(value)
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        raise ValueError("a choice list must hold at least one non-empty string")
    return M.grammar_from_regex(" ?(?:" + "|".join(f"({re.escape(c)})" for c in choices) + ")")


def grammar(kind: str, value=None) -> str:
    """The llguidance grammar of a constraint (cached per process); ``ValueError`` naming why it
    cannot be one."""
    if kind not in KINDS:
        raise ValueError(f"unknown constraint {kind!r}; one of {KINDS}")
    # not sort_keys: a schema's property order is the order the answer's fields are generated in
    key = json.dumps(value, ensure_ascii=False) if kind in ("json_schema", "choice") else value or ""
    return _compiled(kind, key)


def check(kind: str, value, key: str) -> str:
    """The grammar of a constraint, checked: ``ValueError`` naming ``key`` and, in llguidance's
    words, what it cannot follow."""
    try:
        g = grammar(kind, value)
    except ValueError as e:
        raise ValueError(f"{key}: {e}") from None
    err = llg().LLMatcher.validate_grammar(g)
    if err:
        lines = [x.strip() for x in err.strip().splitlines() if x.strip()]
        why = next((x for x in lines if x.startswith("error:")), lines[0])
        raise ValueError(f"{key}: constrained decoding cannot follow it: {why[:200]}")
    return g


def config_grammar(c: ConstraintConfig | None, key: str) -> str | None:
    """The checked grammar of a config's constraint section, or None when it has none."""
    if c is None or c.kind is None:
        if c is not None and c.value is not None:
            raise ValueError(f"{key}.value is set but {key}.kind is not (one of {KINDS})")
        return None
    return check(c.kind, plain(c.value), key)


def plain(x):
    """``x`` as plain dicts and lists (an OmegaConf node from a composed config becomes JSON-able)."""
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(x):
            return OmegaConf.to_container(x, resolve=True)
    except ImportError:
        pass
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
