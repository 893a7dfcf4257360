"""Reading a batch job's input (label, generate) on CPU: the plan before Ray starts and the chunks
the actors read, each against the way it was done before, in one process.

    python bench/bench_inputs.py                 # ~2 minutes
    python bench/bench_inputs.py --gz-mb 50 --reps 1

  plan, bucket   the plan (the scan for line ends and the contents hash) of a folder of JSONL files
                 on an S3-protocol server (moto on loopback) behind a proxy that holds each request
                 --latency-ms (a round trip to a real bucket): files one at a time
                 (``PLAN_THREADS=1``) against side by side
  plan, disk     the same folder on the local disk
  gzip chunks    one of --actors actors reading every --actors-th chunk of a .jsonl.gz file, in
                 order (as Ray Data hands them out): each chunk decompressing its file from the
                 start (the cursor dropped before each chunk: what every chunk did before) against
                 the cursor that goes on where the chunk before left the stream
  parquet chunks the same with a Parquet file of --pq-rows rows in one row group (pyarrow's default
                 holds a million rows), four columns: each chunk reading its row group whole, every
                 column (the code before, kept below) against the reader that reads the text and id
                 columns in batches and goes on from the chunk before
  dispatch       --dispatch-chunks chunks whose work is nothing through the batch jobs' actor pool
                 (an embedded 2-CPU Ray, one actor): a chunk per call against several
                 (``map_chunks``: up to CHUNKS_PER_CALL): what Ray Data costs per call
Order alternated, medians of --reps. Writes bench/results/inputs-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import logging
import os
import platform
import random
import socket
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the tests' fault proxy
from _results import alternated, write_results  # noqa: E402 (bench/, the script's own folder)


def corpus_lines(mb: float, seed: int = 0) -> bytes:
    """About ``mb`` MB of JSONL rows of README words in random order (compresses ~3x, as text does)."""
    rng = random.Random(seed)
    words = open(os.path.join(HERE, "..", "README.md")).read().split()
    out, n, i = [], 0, 0
    while n < mb * 1_000_000:
        line = (json.dumps({"id": f"r{i}", "text": " ".join(rng.choices(words, k=120))}) + "\n").encode()
        out.append(line)
        n, i = n + len(line), i + 1
    return b"".join(out)


def versus(cases: dict, reps: int) -> dict:
    """:func:`_results.alternated` of two cases, the way before first, with the speedup of the second."""
    med = alternated(cases, reps)
    before, now = list(cases)
    return {**med, "speedup": med[before] / med[now]}


def said(name: str, what: str, t: dict) -> str:
    """One line of a comparison: ``<name>: <what>: <before> s, <now> s: <speedup>x``."""
    (before, a), (now, b) = list(t.items())[:2]
    return f"{name}: {what}: {before} {a:.2f} s, {now} {b:.2f} s: {t['speedup']:.1f}x"


def s3_behind_proxy():
    """moto's server on loopback and the fault proxy in front of it; AWS_ENDPOINT_URL set to the proxy."""
    from faults import FaultProxy
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False).start()
    proxy = FaultProxy(port).start()
    for k, v in {
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        os.environ[k] = v
    import boto3

    boto3.client("s3").create_bucket(Bucket="bench-inputs")
    return proxy


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--files", type=int, default=64, help="JSONL files in the planned folder")
    p.add_argument("--file-mb", type=float, default=1.0)
    p.add_argument("--latency-ms", type=float, default=30.0, help="held on each bucket request")
    p.add_argument("--gz-mb", type=float, default=100.0, help="the .jsonl.gz file's size, decompressed")
    p.add_argument("--pq-rows", type=int, default=100_000, help="rows of the Parquet file (one row group)")
    p.add_argument("--actors", type=int, default=4)
    p.add_argument("--dispatch-chunks", type=int, default=3000, help="0: no dispatch case (it starts Ray)")
    p.add_argument("--chunk-rows", type=int, default=256)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()

    from cerbero_ray import batchjob, storage

    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "args": vars(args),
    }
    tmp = tempfile.mkdtemp(prefix="bench-inputs-")
    body = corpus_lines(args.file_mb)
    proxy = s3_behind_proxy()
    folders = {"bucket": "s3://bench-inputs/corpus", "disk": os.path.join(tmp, "corpus")}
    for folder in folders.values():
        for i in range(args.files):
            storage.write_bytes(storage.join(folder, f"f{i:04d}.jsonl"), body)
    proxy.inject("stall", 10**7, args.latency_ms / 1000)

    def plan(folder: str, threads: int):
        def run():
            batchjob.PLAN_THREADS = threads
            batchjob.plan_chunks(folder, "auto", args.chunk_rows, digests={})

        return run

    threads = batchjob.PLAN_THREADS
    for where, folder in folders.items():
        asked = proxy.requests
        batchjob.plan_chunks(folder, "auto", args.chunk_rows)  # warm-up (and the requests of one plan)
        t = versus({"one file at a time": plan(folder, 1), "side by side": plan(folder, threads)}, args.reps)
        res[f"plan_{where}"] = t
        if where == "bucket":
            res["plan_bucket"]["requests_per_file"] = (proxy.requests - asked) / args.files
        print(said(f"plan, {where}", f"{args.files} files x {len(body) / 1e6:.1f} MB, {threads} threads", t))
    batchjob.PLAN_THREADS = threads

    gz = os.path.join(tmp, "corpus.jsonl.gz")
    with open(gz, "wb") as f:
        f.write(gzip.compress(corpus_lines(args.gz_mb, seed=1), compresslevel=6))
    chunks, _ = batchjob.plan_chunks(gz, "auto", args.chunk_rows)
    mine = chunks[0 :: args.actors]

    def read(from_start: bool):
        def run():
            batchjob._READERS.clear()
            for ch in mine:
                if from_start:
                    batchjob._READERS.clear()
                batchjob.read_chunk(ch, "auto", "text", "id")

        return run

    res["gzip_chunks"] = t = versus({"from the start": read(True), "cursor": read(False)}, args.reps)
    share = f"one of {args.actors} actors, {len(mine)} of {len(chunks)} chunks"
    print(said("gzip chunks", f"{share} of a {args.gz_mb:g} MB .jsonl.gz", t))

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(2)
    words = open(os.path.join(HERE, "..", "README.md")).read().split()
    n = args.pq_rows
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "text": [" ".join(rng.choices(words, k=120)) for _ in range(n)],
            "url": [f"https://example.org/{i}" for i in range(n)],
            "meta": [json.dumps({"source": "bench", "n": i}) for i in range(n)],
        }
    )
    pqf = os.path.join(tmp, "corpus.parquet")
    pq.write_table(table, pqf, row_group_size=max(n, 1))
    chunks, _ = batchjob.plan_chunks(pqf, "auto", args.chunk_rows)
    mine = chunks[0 :: args.actors]

    def whole_group(ch):  # the code before: the row group read whole, every column, for each chunk
        out = []
        with batchjob.parquet_file(ch.path) as pf:
            first = 0
            for g in range(pf.metadata.num_row_groups):
                k = pf.metadata.row_group(g).num_rows
                lo, hi = max(ch.start, first), min(ch.stop, first + k)
                if lo < hi:
                    out += pf.read_row_group(g).slice(lo - first, hi - lo).to_pylist()
                first += k
        return out

    def read_pq(before: bool):
        def run():
            batchjob._READERS.clear()
            for ch in mine:
                whole_group(ch) if before else batchjob.read_chunk(ch, "auto", "text", "id")

        return run

    res["parquet_chunks"] = t = versus({"whole row group": read_pq(True), "reader": read_pq(False)}, args.reps)
    share = f"one of {args.actors} actors, {len(mine)} of {len(chunks)} chunks"
    print(said("parquet chunks", f"{share} of {n:,} rows in one row group ({os.path.getsize(pqf) / 1e6:.0f} MB)", t))
    if args.dispatch_chunks:
        res["dispatch"] = dispatch(args.dispatch_chunks, args.reps)
    print("->", write_results("inputs", res))


def dispatch(n: int, reps: int) -> dict:
    """Seconds for ``n`` chunks of no work through :func:`batchjob.map_items`, one chunk a call vs
    as many as :func:`batchjob.map_chunks` gives a call."""
    import ray

    from cerbero_ray import batchjob

    class Nothing(batchjob.ChunkWorker):
        def __init__(self, cfg):
            pass

        def process(self, ch):
            return {"rows": ch.stop - ch.start}

    class Pool:
        workers, gpus_per_worker, cpus_per_worker = 1, 0, 1

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    items = [batchjob.Chunk(f"/c/f{i // 100}.jsonl", i % 100 * 256, i % 100 * 256 + 256).__dict__ for i in range(n)]

    def run(per_call):
        return lambda: sum(1 for _ in batchjob.map_items(items, Nothing, Pool, "label", "dispatch", n * 256, per_call))

    t = versus({"a chunk a call": run(1), "several a call": run(None)}, reps)
    ray.shutdown()
    print(said("dispatch", f"{n} chunks of no work, one actor ({1000 * t['a chunk a call'] / n:.1f} ms a chunk)", t))
    return t


if __name__ == "__main__":
    main()
