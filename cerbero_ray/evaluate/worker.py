"""What one model actor of the evaluation runs: a batch of one task's rows under one protocol, on
the inference core's engines. Plain PyTorch, no Ray (Ray Data runs it in an actor pool)."""

from __future__ import annotations

import json

from cerbero_ray.chat import STOP_STRING
from cerbero_ray.evaluate import evalita, squad
from cerbero_ray.evaluate.metrics import nearest_label
from cerbero_ray.inference.sampling import Sampling


class EvalWorker:
    """One checkpoint; items ``{task, protocol, rows}`` (``rows``: JSON); returns ``{rows, out}``."""

    def __init__(self, cfg: dict):
        from cerbero_ray.config.label_task import LabelTask
        from cerbero_ray.inference.engines import EngineConfig, build_engine
        from cerbero_ray.inference.scorer import Scorer
        from cerbero_ray.models import load_for_inference

        self.cfg = cfg
        model, self.tok = load_for_inference(cfg["checkpoint"], cfg["dtype"])
        longest = max([t["max_new_tokens"] for t in cfg["tasks"].values()] or [1])
        self.batcher = build_engine(
            model,
            self.tok,
            EngineConfig("continuous", cfg["batch_size"], cfg["max_prompt_tokens"], longest, cfg["prefill_tokens"]),
        )
        self.scorers = {
            name: Scorer(model, self.tok, LabelTask(**t["task"]), max_text_tokens=cfg["max_prompt_tokens"])
            for name, t in cfg["tasks"].items()
            if t.get("task")
        }

    def __call__(self, batch: dict) -> dict:
        task, protocol = str(batch["task"][0]), str(batch["protocol"][0])
        rows = json.loads(str(batch["rows"][0]))
        out = self.score(task, rows) if protocol == "score" else self.generate(task, rows)
        return {"task": [task], "protocol": [protocol], "rows": [len(rows)], "out": [json.dumps(out)]}

    def generate(self, task: str, rows: list[dict]) -> list[dict]:
        """Greedy answers (stopping at a newline or ``[|Umano|]``), cleaned and mapped to a prediction."""
        tc = self.cfg["tasks"][task]
        s = Sampling(max_new_tokens=tc["max_new_tokens"], temperature=0.0, stop=[STOP_STRING, "\n"], seed=0)
        prompts = [
            self.tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True) for r in rows
        ]
        out = []
        for r, g in zip(rows, self.batcher.generate(prompts, s)):
            if tc["kind"] == "squad":
                out.append({"id": r["id"], "raw": g["text"], "prediction": squad.clean_answer(g["text"])})
            else:
                label = nearest_label(g["text"], {"no": evalita.NO, "yes": evalita.YES})
                out.append({"id": r["id"], "raw": g["text"], "prediction": int(label == "yes")})
        return out

    def score(self, task: str, rows: list[dict]) -> list[dict]:
        """The label scorer: ``si``/``no`` as the assistant's whole answer, no generation."""
        scored = self.scorers[task].score([r["text"] for r in rows])
        return [
            {"id": r["id"], "p_yes": s["probs"]["yes"], "prediction": int(s["label"] == "yes")}
            for r, s in zip(rows, scored)
        ]
