"""Prefix reuse: the continuous engine with ``prefix_cache`` on against the same engine with it off,
on the same requests in one process, warmed up, the order alternated, medians.

    python bench/bench_prefix.py                 # ~7 minutes: the mid shape, three cases
    python bench/bench_prefix.py --cpu-smoke     # seconds: checks the script runs
    bash bench/gpu_run.sh prefix                 # on a GPU: the full Mistral-7B shape, bf16, random weights

Cases (the real tokenizer's chat template, greedy, 16 new tokens a request, an 8-slot engine):
  system    32 chats with one long system prompt (~510 tokens) and a question each, sent at once
  turns     8 conversations of 4 exchanges, each turn sent for all 8 at once (the self-chat stage's
            pattern): a turn's prompt is the conversation so far
  distinct  32 prompts of ~200 tokens that share nothing past the template (the bookkeeping's cost)
Model: ``mid`` (8 layers of hidden 1,024, ~175 M parameters, random weights: prefill costs what a
real model's does per token at that width), or ``tiny``; on a GPU ``7b`` (bench_serve_gpu's
model, 32 slots). Reports seconds each way, the ratio, the prompt tokens computed and reused, and
whether every text is equal (fp32 on the CPU: required; bf16 on a GPU: recorded, as a copied
prefix was computed in another batch, which changes the last bits). Writes
<out>/prefix-<date>.json (``--out``, default bench/results).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = (
    "il la di che e un una per non con del della si come più anche ma questo sono era molto tutto "
    "casa tempo anno giorno mondo vita città paese lavoro storia mare sole vento strada libro"
).split()


def words(g: random.Random, n: int) -> str:
    return " ".join(g.choice(WORDS) for _ in range(n))


def arguments(doc: str) -> argparse.ArgumentParser:
    """The options of an engine benchmark (this one's and bench_selfchat's)."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--shape", default="mid", choices=["tiny", "mid", "7b"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--slots", type=int, default=None, help="default: 8 (32 on a GPU)")
    ap.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes: checks the script runs")
    return ap


def save(out_dir: str, name: str, cuda: bool, fields: dict) -> str:
    """Write ``<out_dir>/<name>-<date>.json``: the date, the device, the machine, torch's version,
    then ``fields``; print and return its path."""
    import torch

    out = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        **fields,
    }
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}-{datetime.date.today()}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(path)
    return path


def cases(system_words: int, distinct_words: int, n: int, convs: int, turns: int) -> dict:
    """Each case: (conversations sent at once, each a message list; per conversation its later
    questions, one a round, or None for one round): each answer joins its conversation."""
    g = random.Random(0)
    system = words(g, system_words)
    chats = [[{"role": "system", "content": system}, {"role": "user", "content": words(g, 12) + "?"}] for _ in range(n)]
    distinct = [[{"role": "user", "content": words(g, distinct_words)}] for _ in range(n)]
    openers = [[{"role": "user", "content": words(g, 40) + "?"}] for _ in range(convs)]
    follow = [[words(g, 10) + "?" for _ in range(turns)] for _ in range(convs)]
    return {"system": (chats, None), "turns": (openers, follow), "distinct": (distinct, None)}


def run_case(cb, tok, start, follow, s, reuse: bool, at_once: int = 0) -> tuple[float, list[str], int, int]:
    """(seconds, every text, prompt tokens, of them reused) of one case on engine ``cb`` (idle
    between runs) with prefix reuse on or off, starting cold (nothing held from an earlier run);
    each round's prompts sent all at once, or ``at_once`` at a time (the next group when the
    previous one has finished)."""
    from cerbero_ray.inference.prefix import SlotPrefixes

    cb.prefixes = SlotPrefixes(cb.slots.num_slots) if reuse else None
    texts, prompt, cached = [], 0, 0
    t0 = time.perf_counter()
    convs = [list(c) for c in start]
    rounds = len(follow[0]) if follow else 1
    for t in range(rounds):
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        step = at_once or len(prompts)
        out = [o for i in range(0, len(prompts), step) for o in cb.generate(prompts[i : i + step], s)]
        for c, o in zip(convs, out):
            texts.append(o["text"])
            prompt += o["prompt_tokens"]
            cached += o["cached_tokens"]
            c.append({"role": "assistant", "content": o["text"] or "..."})
        if follow:
            for c, f in zip(convs, follow):
                c.append({"role": "user", "content": f[t]})
    return time.perf_counter() - t0, texts, prompt, cached


def main() -> None:
    a = arguments(__doc__).parse_args()
    import torch

    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.tokenizer import build_tokenizer

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    torch.set_num_threads(os.cpu_count() or 1)
    tok = build_tokenizer()
    if a.cpu_smoke:
        a.shape, a.reps = "tiny", 1
        sizes = dict(system_words=60, distinct_words=20, n=6, convs=3, turns=2)
    elif cuda:
        a.shape = "7b"
        sizes = dict(system_words=400, distinct_words=130, n=64, convs=32, turns=4)
    else:
        sizes = dict(system_words=400, distinct_words=130, n=32, convs=8, turns=4)
    a.slots = a.slots or (32 if cuda else 8)
    from bench_prefill import build  # the same tiny, mid and 7b models

    model = build(a.shape)
    s = Sampling(max_new_tokens=16, temperature=0.0, stop=())
    kw = dict(num_slots=a.slots, max_prompt_tokens=1024, max_new_tokens=16, prefill_tokens=8192)
    cb = ContinuousBatcher(model, tok, **kw)  # one engine (one graph capture on a GPU), reuse switched per run
    results = {}
    for name, (start, follow) in cases(**sizes).items():
        for on in (False, True):  # warm-up: every shape once
            run_case(cb, tok, start, follow, s, on)
        times = {False: [], True: []}
        seen = {}
        for rep in range(a.reps):
            for on in (False, True) if rep % 2 == 0 else (True, False):
                sec, texts, prompt, cached = run_case(cb, tok, start, follow, s, on)
                times[on].append(sec)
                seen[on] = (texts, prompt, cached)
        off, on = statistics.median(times[False]), statistics.median(times[True])
        results[name] = {
            "seconds_off": off,
            "seconds_on": on,
            "speedup": off / on,
            "prompt_tokens": seen[True][1],
            "reused_tokens": seen[True][2],
            "computed_tokens_on": seen[True][1] - seen[True][2],
            "texts_equal": seen[True][0] == seen[False][0],
            "runs_off": times[False],
            "runs_on": times[True],
        }
        r = results[name]
        print(
            f"{name:9s} off {off:6.2f} s  on {on:6.2f} s  speedup {r['speedup']:.2f}x  "
            f"prompt tokens {r['prompt_tokens']:,} (reused {r['reused_tokens']:,}, "
            f"{r['reused_tokens'] / max(r['prompt_tokens'], 1):.0%})  texts equal: {r['texts_equal']}",
            flush=True,
        )
    cb.close()
    save(a.out, "prefix", cuda, {"shape": a.shape, "slots": a.slots, "reps": a.reps, "results": results})
    if not cuda and not all(r["texts_equal"] for r in results.values()):
        sys.exit("texts differ between prefix reuse on and off")


if __name__ == "__main__":
    main()
