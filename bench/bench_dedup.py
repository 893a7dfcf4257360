"""What deduplication costs and what it finds (``data.dedup``; CPU).

1. Fingerprinting, per document, in this process: ``exact``, ``near`` and decontamination alone
   (``dedup=none``, against SQuAD-it's sample: its 13-word passages, its texts of 8-12 words
   whole) on the novels (1,231 chunks of ~4 KB) and the chat data (275 conversations), against
   the bare fast tokenizer encoding the same texts (what the packing pass spends on them anyway),
   alternated, medians. And how often ``near`` finds a copy, by how much of it was edited (200 pairs per point).
2. The driver's step, :func:`find_duplicates`, on synthetic fingerprints of 100k and 1M documents
   (5% near copies): seconds and its peak memory (numpy, by tracemalloc).
3. The whole data stage on an embedded Ray cluster, ``none``, ``exact``, ``near``, in turn, the
   order alternated, medians: on the novels as they are (what the pass costs where there is
   little to find) and three times over (as they are, an exact copy in upper case with other
   spacing, a copy with 1 word in 100 changed): seconds and documents kept.

    python bench/bench_dedup.py            # ~6 minutes on 2 cores
    python bench/bench_dedup.py --quick    # parts 1-2 only

Writes bench/results/dedup-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import shutil
import statistics
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))
from _results import alternated, write_results  # noqa: E402 (bench/, the script's own folder)

from cerbero_ray.config.data import SourceConfig  # noqa: E402
from cerbero_ray.data.dedup import BANDS, FileIds, Fingerprints, find_duplicates  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(REPO, "..", "shared", "data")


def rows_of(path: str) -> list[bytes]:
    if path.endswith(".json"):
        return [json.dumps(x, ensure_ascii=False).encode() for x in json.load(open(path))]
    return [line.rstrip(b"\n") for line in open(path, "rb") if line.strip()]


def batch(raws: list[bytes]) -> dict:
    n = len(raws)
    return {
        "source": np.array(["s"] * n, dtype=object),
        "path": np.array(["in.jsonl"] * n, dtype=object),
        "line_no": np.arange(1, n + 1),
        "kind": np.array(["jsonl"] * n, dtype=object),
        "raw": np.array(raws + [b""], dtype=object)[:n],
    }


def texts_of(raws: list[bytes], fmt: str) -> list[str]:
    if fmt == "text":
        return [json.loads(r)["text"] for r in raws]
    return ["\n".join(m["content"] for m in json.loads(r)["messages"]) for r in raws]


def part1(reps: int) -> dict:
    from cerbero_ray.data.decontaminate import eval_grams
    from cerbero_ray.tokenizer import build_tokenizer, encode_plain

    tok = build_tokenizer(None)
    squad = eval_grams([os.path.join(SHARED, "squad_it", "SQuAD_it-test.sample_1k.json")], 13)
    out = {"squad_passages": len(squad[0])}
    for name, path, fmt in (
        ("novels", os.path.join(SHARED, "text_it", "it_novels_packing_5MB.jsonl"), "text"),
        ("chat", os.path.join(SHARED, "chat_it", "eu_it_messages.json"), "openai"),
    ):
        raws = rows_of(path)
        b, texts = batch(raws), texts_of(raws, fmt)
        srcs = {"s": SourceConfig(path="-", format=fmt)}
        runs = {
            "exact": lambda b=b, srcs=srcs: Fingerprints(srcs, "exact")(b),
            "near": lambda b=b, srcs=srcs: Fingerprints(srcs, "near")(b),
            "decontaminate": lambda b=b, srcs=srcs: Fingerprints(srcs, "none", squad)(b),
            "tokenizer": lambda texts=texts: encode_plain(tok, texts),
        }
        for f in runs.values():
            f()  # warm-up
        med = alternated(runs, reps)
        mb = sum(len(r) for r in raws) / 1e6
        out[name] = {
            "documents": len(raws),
            "mb": round(mb, 2),
            **{f"{k}_docs_per_s": round(len(raws) / v) for k, v in med.items()},
            **{f"{k}_mb_per_s": round(mb / v, 2) for k, v in med.items()},
            **{f"{k}_vs_tokenizer": round(v / med["tokenizer"], 2) for k, v in med.items() if k != "tokenizer"},
        }
        print(name, out[name], flush=True)
    return out


def curve(trials: int) -> dict:
    """How often ``near`` pairs a document (300 words of a 5,000-word vocabulary) with a copy with a
    share of its words replaced, by the pair's Jaccard similarity of 5-grams, against the LSH
    theory 1 - (1 - J^8)^14."""
    from cerbero_ray.data.dedup import band_hashes

    rng = random.Random(0)
    vocab = [f"parola{i}" for i in range(5000)]

    def shingles(w):
        return {tuple(w[i : i + 5]) for i in range(len(w) - 4)}

    out = {}
    for frac in (0.01, 0.02, 0.03, 0.05, 0.1):
        js, hits = [], 0
        for _ in range(trials):
            a = [rng.choice(vocab) for _ in range(300)]
            b = list(a)
            for i in rng.sample(range(300), int(frac * 300)):
                b[i] = rng.choice(vocab)
            sa, sb = shingles(a), shingles(b)
            js.append(len(sa & sb) / len(sa | sb))
            hits += bool((band_hashes(" ".join(a)) == band_hashes(" ".join(b))).any())
        j = statistics.mean(js)
        theory = 1 - (1 - j**8) ** 14
        out[f"{frac:.2f}"] = {"jaccard": round(j, 2), "found": round(hits / trials, 3), "theory": round(theory, 3)}
        print("curve", frac, out[f"{frac:.2f}"], flush=True)
    return out


def synthetic(n: int, rng: np.random.Generator) -> dict:
    """Fingerprints of ``n`` documents, 5% of them sharing one band with an earlier one."""
    bands = rng.integers(0, 2**63, (n, BANDS + 1), dtype=np.uint64)
    bands[:, BANDS] = 1
    copies = rng.choice(n, n // 20, replace=False)
    of = rng.integers(0, n, len(copies))
    band = rng.integers(0, BANDS, len(copies))
    bands[copies, band] = bands[of, band]
    return {
        "source": np.array(["s"] * n, dtype=object),
        "path": np.array([f"f{i % 64}.jsonl" for i in range(n)], dtype=object),
        "line_no": np.arange(n) // 64,
        "exact": rng.integers(0, 2**63, n, dtype=np.uint64),
        "bands": bands,
    }


def part2(sizes: list[int]) -> dict:
    out = {}
    for n in sizes:
        fp = synthetic(n, np.random.default_rng(0))
        files = FileIds([("s", f"f{i}.jsonl") for i in range(64)])
        fp = files.compact(fp)
        tracemalloc.start()
        t = time.perf_counter()
        table = find_duplicates(fp, files)
        s = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        inputs = sum(v.nbytes for v in fp.values())
        out[str(n)] = {
            "seconds": round(s, 2),
            "peak_mb": round(peak / 1e6),
            "fingerprints_mb": round(inputs / 1e6),
            "duplicates": table.num_rows,
        }
        print("find_duplicates", n, out[str(n)], flush=True)
    return out


def part3(work: str, reps: int) -> dict:
    from cerbero_ray.config.common import ClusterConfig
    from cerbero_ray.runtime import init_ray

    rng = random.Random(0)
    rows = [json.loads(r) for r in rows_of(os.path.join(SHARED, "text_it", "it_novels_packing_5MB.jsonl"))]
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "novels_3x.jsonl")
    with open(corpus, "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n")
        for r in rows:
            f.write(json.dumps({"text": "  " + r["text"].upper().replace(" ", "  ")}, ensure_ascii=False) + "\n")
        for r in rows:
            w = r["text"].split(" ")
            for i in rng.sample(range(len(w)), len(w) // 100):
                w[i] = "parola"
            f.write(json.dumps({"text": " ".join(w)}, ensure_ascii=False) + "\n")
    plain = os.path.join(work, "novels_1x.jsonl")
    with open(plain, "w") as f:
        for r in rows:
            f.write(json.dumps({"text": r["text"]}, ensure_ascii=False) + "\n")
    init_ray(ClusterConfig(num_cpus=os.cpu_count()))
    return {"novels_1x": stage_runs(plain, work, reps), "novels_3x": stage_runs(corpus, work, reps)}


def stage_runs(corpus: str, work: str, reps: int) -> dict:
    from bench_data import data_config

    from cerbero_ray.data.pipeline import run_data

    modes = ["none", "exact", "near"]
    times, kept = {m: [] for m in modes}, {}
    for r in range(reps):
        for mode in modes[:: 1 if r % 2 == 0 else -1]:
            out = os.path.join(work, f"out_{mode}")
            shutil.rmtree(out, ignore_errors=True)
            cfg = data_config({"s": {"path": corpus, "format": "text"}}, out, 8192, loss_on="all", dedup=mode)
            t = time.perf_counter()
            m = run_data(cfg)
            times[mode].append(time.perf_counter() - t)
            kept[mode] = {"documents": m["documents"], "tokens": m["tokens"], "dedup": m["dedup"]}
            print(os.path.basename(corpus), mode, round(times[mode][-1], 1), kept[mode], flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {m: {"seconds": round(med[m], 1), "vs_none": round(med[m] / med["none"], 2), **kept[m]} for m in modes}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--stage-reps", type=int, default=3)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="documents for part 2")
    p.add_argument("--work", default=os.path.join(REPO, ".bench", "dedup"))
    a = p.parse_args()
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "fingerprints": part1(a.reps),
        "near_curve": curve(200),
        "find_duplicates": part2(a.sizes),
    }
    if not a.quick:
        res["stage"] = part3(a.work, a.stage_reps)
    print(f"written {write_results('dedup', res)}")


if __name__ == "__main__":
    main()
