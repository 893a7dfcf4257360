"""What one model actor of the evaluation runs: batches of request rows (columns ``task``, ``unit``,
``id``, ``messages`` or ``text``, ``max_new_tokens``, ``stop_at_newline``, ``choices``), each answered on the
inference core's engines. Plain PyTorch, no Ray (Ray Data runs it in an actor pool).

- a row with ``messages``: greedy generation on the continuous-batching engine, stopping at
  ``[|Umano|]`` (and at a newline when ``stop_at_newline``): its ``raw`` answer; with ``choices``
  (a JSON list), the answer held to exactly one of them (a choice grammar);
- a row with ``text``: the label scorer of its unit's yes/no task: ``p_yes``.

Every result row says whether its prompt was cut to fit (``truncated``).
"""

from __future__ import annotations

import json
from collections import defaultdict

from cerbero_ray.chat import STOP_STRING
from cerbero_ray.config.sampling import Sampling
from cerbero_ray.evaluate.backends import ModelRun


def sampling(max_new_tokens: int, stop_at_newline: bool, choices: str | None = None) -> Sampling:
    """Greedy, stopping at the user's tag (and a newline): what every generating protocol uses;
    ``choices`` (a JSON list): the answer is exactly one of them."""
    g = None
    if choices:
        from cerbero_ray.inference.grammar import grammar

        g = grammar("choice", json.loads(choices))
    stop = [STOP_STRING, *(["\n"] if stop_at_newline else [])]
    return Sampling(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop, seed=0, grammar=g)


class EvalWorker:
    """One checkpoint, HF weights, run as ``cfg`` says (its engine settings, the longest answer,
    the score units' label tasks)."""

    def __init__(self, cfg: ModelRun):
        from cerbero_ray.inference.engines import EngineConfig, build_engine
        from cerbero_ray.models import load_for_inference

        self.cfg = cfg
        self.model, self.tok = load_for_inference(cfg.checkpoint, cfg.dtype)
        engine = EngineConfig(
            "continuous", cfg.batch_size, cfg.max_prompt_tokens, cfg.max_new_tokens, cfg.prefill_tokens
        )
        self.batcher = build_engine(self.model, self.tok, engine)
        self.scorers = {}

    def _scorer(self, key: str):
        """The label scorer of a unit's task, or of one row's own (per-row shots: at most 64 kept)."""
        if key not in self.scorers:
            if len(self.scorers) >= 64:
                self.scorers.pop(next(iter(self.scorers)))
            from cerbero_ray.config.label_task import LabelTask
            from cerbero_ray.inference.scorer import Scorer

            task = LabelTask(**self.cfg.tasks[key])
            self.scorers[key] = Scorer(self.model, self.tok, task, max_text_tokens=self.cfg.max_prompt_tokens)
        return self.scorers[key]

    def __call__(self, batch) -> dict:
        self.batcher.forget()  # a batch's answers depend on the batch alone, however the rows were split
        rows = batch.to_pylist()
        out = [None] * len(rows)
        groups = defaultdict(list)  # (task, unit, max_new_tokens, stop_at_newline, scorer, choices) -> rows
        for i, r in enumerate(rows):
            scorer = r.get("scorer") or f"{r['task']}/{r['unit']}" if r["text"] is not None else None
            key = (r["task"], r["unit"], r["max_new_tokens"], r["stop_at_newline"], scorer, r.get("choices"))
            groups[key].append(i)
        for (_task, _unit, new, newline, scorer, choices), idx in groups.items():
            if scorer:
                for i, s in zip(idx, self._scorer(scorer).score([rows[i]["text"] for i in idx])):
                    p_yes = s["probs"]["yes"] if s.get("probs") else None
                    out[i] = {"raw": None, "p_yes": p_yes, "truncated": bool(s["truncated"])}
            else:
                prompts = [
                    self.tok.apply_chat_template(rows[i]["messages"], tokenize=False, add_generation_prompt=True)
                    for i in idx
                ]
                for i, g in zip(idx, self.batcher.generate(prompts, sampling(new, newline, choices))):
                    out[i] = {"raw": g["text"], "p_yes": None, "truncated": bool(g["truncated"])}
        return {
            "task": [r["task"] for r in rows],
            "unit": [r["unit"] for r in rows],
            "id": [r["id"] for r in rows],
            "raw": [o["raw"] for o in out],
            "p_yes": [o["p_yes"] for o in out],
            "truncated": [o["truncated"] for o in out],
            "rows": [1] * len(rows),
        }
