"""Labeling throughput on CPU: label scoring vs generate-an-answer-then-parse, same rows, one run.

    python bench/bench_label.py                    # the tiny model, 107 shipped texts, sentiment
    python bench/bench_label.py --rows 40 --reps 1 # quicker

Both use the same model (tiny random-init Mistral, the real tokenizer), the same prompts (the
sentiment task with its few-shot examples) and one process (no Ray):
  scoring    cerbero_ray.inference.scorer.Scorer: one forward pass per prompt scores every label
  generate   greedy generation of an answer (stop at [|Umano|] or end of turn), then the text is
             matched against the verbalizers (the usual approach), with two answer budgets:
             --answer-tokens (default 32: room for the sentence a chat model answers with) and the
             bare minimum, the longest verbalizer + end of turn (5 tokens for sentiment); and the
             --answer-tokens budget one row at a time (a per-text generate loop), for reference
Reports rows/s of each and the ratios. The random model never ends its answer early, so the
baseline always spends its whole budget; a trained model that answers with the bare label would
stop sooner. Writes bench/results/label-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _results import write_results  # noqa: E402 (bench/, the script's own folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse(answer: str, task) -> str | None:
    """The generate-then-parse baseline's parser: the first verbalizer the answer starts with."""
    a = answer.strip().lower()
    for label, verb in task.labels.items():
        if a.startswith(verb.lower()):
            return label
    return None


def timed(fn, reps: int):
    """(median seconds of ``reps`` calls, the last call's result)."""
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2], out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=107)
    p.add_argument("--task", default="sentiment")
    p.add_argument("--answer-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3, help="timed passes of each method; the median counts")
    p.add_argument("--per-row-rows", type=int, default=32, help="rows for the one-row-at-a-time baseline")
    a = p.parse_args()

    import torch
    import yaml

    from cerbero_ray.config.label_task import task_from_dict
    from cerbero_ray.inference.generator import Generator
    from cerbero_ray.inference.label_prompts import continuations, prompt_text
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.inference.scorer import Scorer
    from cerbero_ray.models import tiny
    from cerbero_ray.tokenizer import build_tokenizer

    torch.set_num_threads(os.cpu_count())
    tok = build_tokenizer()
    task = task_from_dict(yaml.safe_load(open(os.path.join(REPO, "conf", "label", "task", f"{a.task}.yaml"))))
    texts = [json.loads(x)["text"] for x in open(os.path.join(REPO, "data", "samples", "label_it_sample.jsonl"))]
    texts = (texts * (a.rows // len(texts) + 1))[: a.rows]
    model = tiny().eval()

    scorer = Scorer(model, tok, task)
    scorer.score(texts[:4])  # warm-up
    t_score, scored = timed(lambda: scorer.score(texts), a.reps)

    gen = Generator(model, tok, batch_size=16)
    longest = max(len(c) for c in continuations(task, tok).values())
    prompts = [prompt_text(task, x, tok) for x in texts]
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "rows": a.rows,
        "reps": a.reps,
        "task": a.task,
        "model": "tiny (2 layers, hidden 64, vocab 32000)",
        "scoring_rows_per_s": round(a.rows / t_score, 1),
        "scoring_unlabeled_rows": sum(r["label"] is None for r in scored),
    }
    for name, budget in (("answer", a.answer_tokens), ("minimal", longest)):
        sampling = Sampling(max_new_tokens=budget, temperature=0.0, stop=("[|Umano|]",))
        gen.generate(prompts[:4], sampling)
        # rendering the prompts is timed, as in scoring
        t_gen, answers = timed(lambda s=sampling: gen.generate([prompt_text(task, x, tok) for x in texts], s), a.reps)
        parsed = [parse(r["text"], task) for r in answers]
        res[f"generate_{name}_max_new_tokens"] = budget
        res[f"generate_{name}_rows_per_s"] = round(a.rows / t_gen, 1)
        res[f"generate_{name}_unparsed_rows"] = sum(x is None for x in parsed)
        res[f"ratio_vs_{name}"] = round(t_gen / t_score, 2)
    # the same answer budget, one row at a time (a loop over the corpus calling generate per text,
    # as many labeling scripts do); on the first --per-row-rows texts, once (its rows/s is per row)
    sampling = Sampling(max_new_tokens=a.answer_tokens, temperature=0.0, stop=("[|Umano|]",))
    one = Generator(model, tok, batch_size=1)
    sub = texts[: a.per_row_rows]
    t0 = time.perf_counter()
    for x in sub:
        one.generate([prompt_text(task, x, tok)], sampling)
    t_row = (time.perf_counter() - t0) / len(sub)
    res["generate_per_row_rows"] = len(sub)
    res["generate_per_row_rows_per_s"] = round(1 / t_row, 1)
    res["ratio_vs_per_row"] = round(t_row * a.rows / t_score, 2)
    print(json.dumps(res, indent=1))
    write_results("label", res)


if __name__ == "__main__":
    main()
