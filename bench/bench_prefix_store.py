"""The host prefix store: chats that come back after others took their cache slot. The continuous
engine with prefix reuse from its slots alone against the same engine with a host store
(``prefix_store_bytes``), and without reuse for reference; the same requests in one process,
warmed up, the order alternated, medians.

    python bench/bench_prefix_store.py               # ~13 minutes: the mid shape, 24 chats on 8 slots, then 7
    python bench/bench_prefix_store.py --part light  # ~4 minutes: the light-load part alone
    python bench/bench_prefix_store.py --cpu-smoke   # seconds: checks the script runs
    bash bench/gpu_run.sh prefix_store               # on a GPU: the full Mistral-7B shape, bf16, random weights

Workload (the real tokenizer's chat template, greedy, 16 new tokens a request): 3 x the slots
chats, each opened by a ~150-word message, then 3 more exchanges of a ~10-word question; each
round sends every chat's next turn at once, so between two turns of a chat the others take its
slot. A turn's prompt is its chat so far: with slots alone it finds its earlier turns only when its
slot was not taken; with the store they are copied back (saved when the slot was taken). On a GPU
the copies out cost device-to-host transfers, on the same stream as the steps: the figure says
whether the store pays there. Reports seconds each way, the ratios, prompt tokens computed and
reused, the store's hits, and whether every text is equal (fp32 on the CPU: required).

Light load (the same engine, no store): ``slots - 1`` chats (the same openers and questions), each
round's turns sent two at a time, so two slots decode and the others sit idle. A newcomer takes a
slot among the rows the decode steps compute, and what that slot held moves to an idle one ("idle
slots kept", the engine's default) against the choice before, where each request took the lowest
free slot and overwrote what it held ("lowest free slot", ``ContinuousBatcher.park = False``), and
without reuse. ``--part store`` skips it (the GPU stage does: its device time is short), ``--part
light`` runs it alone.
Writes <out>/prefix_store-<date>.json (``--out``, default bench/results).
"""

from __future__ import annotations

import os
import random
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from bench_prefix import arguments, run_case, save, words  # noqa: E402

WAYS = ("no reuse", "slots", "slots + store")
LIGHT = ("no reuse", "lowest free slot", "idle slots kept")


def chats(n: int, opener_words: int, rounds: int) -> tuple[list, list]:
    g = random.Random(0)
    start = [[{"role": "user", "content": words(g, opener_words) + "?"}] for _ in range(n)]
    follow = [[words(g, 10) + "?" for _ in range(rounds - 1)] for _ in range(n)]
    return start, follow


def run_way(cb, tok, way: str, start, follow, s, pool, at_once: int = 0) -> tuple[float, list[str], int, int, int]:
    """(seconds, every text, prompt tokens, of them reused, store hits) of one way on engine ``cb``
    (idle between runs), starting cold (nothing held from an earlier run): bench_prefix's
    ``run_case``, with the store set for it; ``pool``: the store's host memory, allocated once."""
    from cerbero_ray.inference.prefix import HostPrefixes

    cb.store, cb.park = None, way != "lowest free slot"
    if way == "slots + store":
        cb.store = HostPrefixes(pool.shape[0], pool.shape[3])
        cb.store.pool = pool
    # run_case appends a round's question after every round, the last one's never sent
    out = run_case(cb, tok, start, [f + [""] for f in follow], s, way != "no reuse", at_once)
    return (*out, cb.store.hits if cb.store is not None else 0)


def measure(cb, tok, ways, start, follow, s, pool, reps: int, at_once: int = 0) -> dict:
    """Every way once (warm-up), then ``reps`` rounds in alternating order: per way the median
    seconds, the runs, prompt tokens computed and reused, store hits, and whether its texts equal
    the first way's."""
    for way in ways:
        run_way(cb, tok, way, start, follow, s, pool, at_once)
    times, seen = {w: [] for w in ways}, {}
    for rep in range(reps):
        for way in ways if rep % 2 == 0 else ways[::-1]:
            sec, *seen[way] = run_way(cb, tok, way, start, follow, s, pool, at_once)
            times[way].append(sec)
    results = {
        w: {
            "seconds": statistics.median(times[w]),
            "runs": times[w],
            "prompt_tokens": seen[w][1],
            "reused_tokens": seen[w][2],
            "computed_tokens": seen[w][1] - seen[w][2],
            "store_hits": seen[w][3],
            "texts_equal_to_no_reuse": seen[w][0] == seen[ways[0]][0],
        }
        for w in ways
    }
    for w in ways:
        r = results[w]
        print(
            f"{w:16s} {r['seconds']:7.2f} s  prompt tokens {r['prompt_tokens']:,}, "
            f"computed {r['computed_tokens']:,} (reused {r['reused_tokens']:,}; store hits {r['store_hits']})  "
            f"texts equal: {r['texts_equal_to_no_reuse']}",
            flush=True,
        )
    return results


def main() -> None:
    ap = arguments(__doc__)
    ap.add_argument("--store-gib", type=float, default=8.0, help="the store's host memory (default 8)")
    ap.add_argument(
        "--part", choices=["both", "store", "light"], default="both", help="the store's part, the light load's, or both"
    )
    a = ap.parse_args()
    import torch

    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.inference.sampling import Sampling
    from cerbero_ray.tokenizer import build_tokenizer

    cuda = torch.cuda.is_available() and not a.cpu_smoke
    torch.set_num_threads(os.cpu_count() or 1)
    tok = build_tokenizer()
    opener, rounds = 150, 4
    if a.cpu_smoke:
        a.shape, a.reps, a.slots, opener, rounds = "tiny", 1, 4, 40, 2
    elif cuda:
        a.shape = "7b"
        opener = 300
    a.slots = a.slots or (32 if cuda else 8)
    a.store_gib = a.store_gib if not a.cpu_smoke else 0.05
    from bench_prefill import build  # the same tiny, mid and 7b models

    model = build(a.shape)
    s = Sampling(max_new_tokens=16, temperature=0.0, stop=())
    kw = dict(num_slots=a.slots, max_prompt_tokens=2048, max_new_tokens=16, prefix_store_bytes=int(a.store_gib * 2**30))
    cb = ContinuousBatcher(model, tok, **kw)
    print(cb.describe(), flush=True)
    start, follow = chats(3 * a.slots, opener, rounds)
    pool = cb.store.pool  # the store's host memory, allocated once: each way with a store uses it
    fields = {"shape": a.shape, "slots": a.slots, "chats": len(start), "rounds": rounds, "reps": a.reps}
    results, light = {}, {}
    if a.part in ("both", "store"):
        print(f"{len(start)} chats on {a.slots} slots, each round's turns at once:", flush=True)
        results = measure(cb, tok, WAYS, start, follow, s, pool, a.reps)
        med = {w: r["seconds"] for w, r in results.items()}
        ratio = med["slots"] / med["slots + store"]
        print(f"store vs slots alone: {ratio:.2f}x; vs no reuse: {med['no reuse'] / med['slots + store']:.2f}x")
        fields |= {"store_gib": a.store_gib, "store_vs_slots": ratio, "results": results}
    if a.part in ("both", "light"):
        print(f"{a.slots - 1} chats on {a.slots} slots, each round's turns two at a time:", flush=True)
        light = measure(cb, tok, LIGHT, start[: a.slots - 1], follow[: a.slots - 1], s, pool, a.reps, at_once=2)
        idle = light["lowest free slot"]["seconds"] / light["idle slots kept"]["seconds"]
        print(f"idle slots kept vs lowest free slot: {idle:.2f}x")
        fields |= {"light_chats": a.slots - 1, "idle_vs_lowest": idle, "light": light}
    cb.close()
    save(a.out, "prefix_store", cuda, fields)
    if not cuda and not all(r["texts_equal_to_no_reuse"] for r in [*results.values(), *light.values()]):
        sys.exit("texts differ between the ways")


if __name__ == "__main__":
    main()
