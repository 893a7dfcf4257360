"""Self-chat on the continuous engine: each conversation a chain of requests (``ContinuousBatcher.chains``:
a turn is queued as its previous one ends and finds the conversation in the slot it left) against
the half-turn-by-half-turn waves (every conversation's turn, then the next), with and without
prefix reuse; the same engine, the same conversations, in one process, warmed up, the order
alternated, medians.

    python bench/bench_selfchat.py               # ~17 minutes: the mid shape, 32 conversations on 8 slots
    python bench/bench_selfchat.py --cpu-smoke   # seconds: checks the script runs
    bash bench/gpu_run.sh selfchat               # on a GPU: the full Mistral-7B shape, bf16, random weights

Workload (the real tokenizer's chat template, greedy, more conversations than slots as a
generate chunk has: 64 rows, 16 slots by default; here 4 x the slots, 2 x on a GPU): each seed a
~40-word question, ``turns`` exchanges. Random weights rarely end a turn, so the answers stop at a
stop string their text hits at random ("z": lengths vary as real answers' do, and a wave waits
for its longest); the human turns run to their token limit. The length and repetition filters
are off; greedy, every way writes the same conversations on the CPU in fp32 (sampled, they could
differ where a copied prefix's last bits move a draw across a boundary of a random model's
near-flat distribution). Reports seconds, the ratio to the waves with reuse, the prompt tokens
computed, and whether the conversations are equal. Writes <out>/selfchat-<date>.json (``--out``).
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


class Waves:
    """The engine seen as a plain generator: self-chat runs its turn-by-turn path on it."""

    def __init__(self, engine):
        self.engine, self.tok = engine, engine.tok

    def generate(self, prompts, sampling, seed=None):
        return self.engine.generate(prompts, sampling, seed=seed)


def run_way(cb, way: str, seeds: list[str], kw: dict) -> tuple[float, list, int]:
    """(seconds, conversations, prompt tokens computed) of one way on engine ``cb`` (idle between
    runs), starting cold (nothing held from an earlier run)."""
    from cerbero_ray.generate.selfchat import self_chat
    from cerbero_ray.inference.prefix import SlotPrefixes

    cb.prefixes = SlotPrefixes(cb.slots.num_slots) if way != "waves, no reuse" else None
    computed, real = [], cb.slots.prefill
    cb.slots.prefill = lambda p, s, a=None: computed.extend(len(x) for x in p) or real(p, s, a)
    try:
        t0 = time.perf_counter()
        convs, _ = self_chat(cb if way == "chains" else Waves(cb), seeds, **kw)
        return time.perf_counter() - t0, convs, sum(computed)
    finally:
        cb.slots.prefill = real


def main() -> None:
    from bench_prefill import build  # the same tiny, mid and 7b models
    from bench_prefix import WORDS, arguments, save  # its options, its words, its result file

    ap = arguments(__doc__)
    ap.add_argument("--conversations", type=int, default=None, help="default: 4 x the slots (2 x on a GPU)")
    ap.add_argument("--turns", type=int, default=3)
    a = ap.parse_args()
    import torch

    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.tokenizer import build_tokenizer

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    torch.set_num_threads(os.cpu_count() or 1)
    tok = build_tokenizer()
    answer, ask = 48, 24  # new tokens: an answer at most, a human turn
    if a.cpu_smoke:
        a.shape, a.reps, a.slots, a.conversations, a.turns = "tiny", 1, 2, 5, 2
        answer, ask = 12, 6
    elif cuda:
        a.shape = "7b"
        answer, ask = 96, 32
    a.slots = a.slots or (32 if cuda else 8)
    a.conversations = a.conversations or (2 if cuda else 4) * a.slots
    model = build(a.shape)
    g = random.Random(0)
    seeds = [" ".join(g.choice(WORDS) for _ in range(40)) + "?" for _ in range(a.conversations)]
    s = Sampling(max_new_tokens=answer, temperature=0.0, stop=("z",))
    kw = dict(
        turns=a.turns,
        sampling=s,
        user_sampling=Sampling(max_new_tokens=ask, temperature=0.0),
        min_chars=0,  # no filter: every conversation goes on, in every way alike
        max_repeat=1.0,
        drop_unfinished=False,
        seed=7,
    )
    longest = 200 + a.turns * (answer + ask + 16)
    cb = ContinuousBatcher(model, tok, num_slots=a.slots, max_prompt_tokens=longest, max_new_tokens=answer)
    ways = ("waves, no reuse", "waves", "chains")
    run_way(cb, "chains", seeds[: a.slots], kw)  # warm-up: every batch shape the runs meet, or most
    run_way(cb, "waves", seeds[: a.slots], kw)
    times = {w: [] for w in ways}
    seen = {}
    for rep in range(a.reps):
        for w in ways if rep % 2 == 0 else ways[::-1]:
            sec, convs, computed = run_way(cb, w, seeds, kw)
            print(f"  run {rep + 1}: {w}: {sec:.2f} s", flush=True)
            times[w].append(sec)
            seen[w] = (convs, computed)
    cb.close()
    base = statistics.median(times["waves"])
    results = {}
    for w in ways:
        convs, computed = seen[w]
        results[w] = {
            "seconds": statistics.median(times[w]),
            "vs_waves": base / statistics.median(times[w]),
            "computed_prompt_tokens": computed,
            "runs": times[w],
            "conversations_equal": convs == seen["waves"][0],
            "exchanges": sum(len(c or []) // 2 for c in convs),
        }
        r = results[w]
        print(
            f"{w:16s} {r['seconds']:7.2f} s  {r['vs_waves']:.2f}x the waves  prompt tokens computed "
            f"{computed:,}  exchanges {r['exchanges']}  same conversations: {r['conversations_equal']}",
            flush=True,
        )
    fields = {"shape": a.shape, "slots": a.slots, "conversations": a.conversations, "turns": a.turns}
    save(
        a.out,
        "selfchat",
        cuda,
        {**fields, "new_tokens": {"answer": answer, "human": ask}, "reps": a.reps, "results": results},
    )
    if not cuda and not all(r["conversations_equal"] for r in results.values()):
        sys.exit("the conversations differ between the ways")


if __name__ == "__main__":
    main()
