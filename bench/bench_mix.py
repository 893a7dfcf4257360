"""Source mix per global batch: how close each optimizer step's batch is to the corpus mix.

    python bench/bench_mix.py                                   # novels + EU chat from ../shared/data
    python bench/bench_mix.py --data-dir outputs/data/mix_sample --workers 8 --global-batch 64

The data stage writes one shard per buffer of ``data.buffer_docs`` documents, and a buffer usually
holds one source. This script runs the data stage on two sources of very different sizes (or reads
an existing ``--data-dir``), then plans epoch 0 as the trainer would (``train/plan.py``) for each
``train.mix_block_rows`` and measures, per global batch, each source's share of the tokens against
its share of the corpus: the total variation distance ``½ Σ |batch − corpus|`` (0: the corpus mix;
1: disjoint). The floor is the same measure for global batches drawn as uniform random rows.
Writes bench/results/mix-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import sys
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from _results import write_results  # noqa: E402 (bench/, the script's own folder)

from cerbero_ray.train.plan import plan_epoch, step_rows  # noqa: E402

SHARED = os.path.join(REPO, "..", "shared", "data")


def make_data(out: str, seq_len: int, buffer_docs: int) -> dict:
    from bench_data import data_config  # noqa: E402 (this folder is on sys.path when run as a script)

    from cerbero_ray.config.common import ClusterConfig
    from cerbero_ray.data.pipeline import run_data
    from cerbero_ray.runtime import init_ray

    init_ray(ClusterConfig(num_cpus=os.cpu_count()))
    shutil.rmtree(out, ignore_errors=True)
    sources = {
        "novels": {"path": os.path.join(SHARED, "text_it", "it_novels_packing_5MB.jsonl"), "format": "text"},
        "chat": {"path": os.path.join(SHARED, "chat_it", "eu_it_messages.json"), "format": "openai", "weight": 2.0},
    }
    return run_data(data_config(sources, out, seq_len, buffer_docs=buffer_docs))


def row_mixes(shards: list[dict]) -> dict[tuple[str, int], Counter]:
    """Tokens per source of every row, keyed by (shard path, row)."""
    out = {}
    for s in shards:
        t = pq.read_table(s["path"], columns=["doc_sources", "doc_tokens"]).to_pydict()
        for r, (names, lengths) in enumerate(zip(t["doc_sources"], t["doc_tokens"])):
            c = Counter()
            for n, k in zip(names, lengths):
                c[n] += k
            out[(s["path"], r)] = c
    return out


def tvd(batch: Counter, corpus: dict[str, float]) -> float:
    total = sum(batch.values())
    return 0.5 * sum(abs(batch.get(k, 0) / total - p) for k, p in corpus.items())


def summarize(dists: list[float]) -> dict:
    d = np.asarray(dists)
    return {
        "steps": len(d),
        "mean_tvd": round(float(d.mean()), 4),
        "p95_tvd": round(float(np.percentile(d, 95)), 4),
        "max_tvd": round(float(d.max()), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="an existing data-stage output (else one is made)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--buffer-docs", type=int, default=64)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--global-batch", type=int, default=64)
    ap.add_argument("--blocks", default="0,16,4,1", help="train.mix_block_rows values to compare")
    ap.add_argument("--seeds", type=int, default=10, help="plans measured (train.seed 0..N-1)")
    args = ap.parse_args()

    out = args.data_dir or os.path.join(REPO, "outputs", "bench", "mix")
    if args.data_dir is None:
        make_data(out, args.seq_len, args.buffer_docs)
    manifest = json.load(open(os.path.join(out, "manifest.json")))
    shards = [s for s in manifest["shards"] if s["rows"] > 0]
    mixes = row_mixes(shards)
    tokens = Counter()
    for c in mixes.values():
        tokens.update(c)
    corpus = {k: v / sum(tokens.values()) for k, v in tokens.items()}
    shard_sources: dict[str, set] = {}
    for (path, _), c in mixes.items():
        shard_sources.setdefault(path, set()).update(c)
    single = sum(1 for names in shard_sources.values() if len(names) == 1)
    accum = args.global_batch // (args.micro_batch * args.workers)
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "data": {
            "dir": out,
            "rows": len(mixes),
            "shards": len(shards),
            "single_source_shards": single,
            "corpus_token_share": {k: round(v, 4) for k, v in corpus.items()},
        },
        "plan": {
            "workers": args.workers,
            "micro_batch": args.micro_batch,
            "global_batch": args.global_batch,
            "seeds": args.seeds,
        },
        "by_mix_block_rows": {},
    }
    for block in (int(b) for b in args.blocks.split(",")):
        dists = []
        for seed in range(args.seeds):  # epoch 0 of runs with different train.seed: more batches to measure
            p = plan_epoch(
                shards, 0, world_size=args.workers, micro_batch=args.micro_batch, accum=accum, seed=seed,
                mix_block_rows=block,
            )  # fmt: skip
            for step in range(p.steps):
                batch = Counter()
                for seg in step_rows(p, step, args.micro_batch, accum):
                    for r in range(seg.start, seg.stop):
                        batch.update(mixes[(seg.path, r)])
                dists.append(tvd(batch, corpus))
        result["by_mix_block_rows"][str(block)] = summarize(dists)
    rng = np.random.default_rng(0)
    keys = list(mixes)
    floor = []
    for _ in range(2000):
        batch = Counter()
        for i in rng.choice(len(keys), size=min(args.global_batch, len(keys)), replace=False):
            batch.update(mixes[keys[i]])
        floor.append(tvd(batch, corpus))
    result["uniform_random_rows"] = summarize(floor)

    print(
        f"{result['data']['rows']} rows in {len(shards)} shards ({single} of one source); corpus tokens "
        + ", ".join(f"{k} {v:.1%}" for k, v in corpus.items())
    )
    print(f"global batch {args.global_batch} rows = {args.workers} workers × {args.micro_batch} × {accum} accumulation")
    print(f"{'mix_block_rows':>22} {'steps':>6} {'mean TVD':>9} {'p95':>7} {'max':>7}")
    rows = [*result["by_mix_block_rows"].items(), ("uniform rows (floor)", result["uniform_random_rows"])]
    for name, r in rows:
        label = f"{name} (shard order)" if name == "0" else name
        print(f"{label:>22} {r['steps']:>6} {r['mean_tvd']:>9.4f} {r['p95_tvd']:>7.4f} {r['max_tvd']:>7.4f}")
    print(f"written {write_results('mix', result)}")


if __name__ == "__main__":
    main()
