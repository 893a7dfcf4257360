"""Serving throughput on CPU: batching vs one request at a time, 32 concurrent clients, one run.

    python bench/bench_serve.py                  # tiny model, 128 requests each way, 32 new tokens each
    python bench/bench_serve.py --requests 64    # quicker

The same app, model and requests, deployed in turn on an embedded Ray cluster, one replica each:
  continuous         serve.engine=continuous (the default), 32 slots: requests join the running batch
  continuous_stream  the same, every request streamed (server-sent events)
  hf_batched         serve.engine=hf, serve.max_batch_size=32: @serve.batch + transformers generate
  per_request        serve.engine=hf, serve.max_batch_size=1: each request its own generate (the baseline)
Clients: 32 threads posting /v1/chat/completions (greedy, max_tokens 32, 8 different prompts).
Reports requests/s, new tokens/s, p50/p95 latency and each throughput ratio to the baseline.
Writes bench/results/serve-<date>.json.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _results import write_results  # noqa: E402 (bench/, the script's own folder)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "Ciao! Come stai?",
    "Qual è la capitale d'Italia?",
    "Raccontami una storia breve.",
    "Che cos'è la fotosintesi?",
    "Come si prepara il caffè?",
    "Dammi un consiglio per studiare.",
    "Chi era Dante Alighieri?",
    "Perché piove?",
]


def post(url: str, i: int, tokens: int, stream: bool = False) -> tuple[float, int, int]:
    body = {
        "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": stream,
    }
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            if not stream:
                return time.perf_counter() - t0, r.status, json.loads(r.read())["usage"]["completion_tokens"]
            new = 0
            for line in r:
                if line.startswith(b"data: {"):
                    new = (json.loads(line[6:]).get("usage") or {}).get("completion_tokens", new)
            return time.perf_counter() - t0, r.status, new
    except urllib.error.HTTPError as e:
        return time.perf_counter() - t0, e.code, 0


def load(url: str, n: int, clients: int, tokens: int, stream: bool = False) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: post(url, i, tokens, stream), range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {
        "requests_per_s": round(n / wall, 2),
        "new_tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
        "p50_s": round(statistics.median(lat), 3),
        "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
        "errors": sum(r[1] != 200 for r in results),
        "wall_s": round(wall, 1),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()

    from ray import serve

    from cerbero_ray.config import compose, to_container
    from cerbero_ray.config.common import ClusterConfig
    from cerbero_ray.models import tiny
    from cerbero_ray.runtime import init_ray, shutdown_ray
    from cerbero_ray.serve.service import run_serve
    from cerbero_ray.tokenizer import build_tokenizer

    ckpt = tempfile.mkdtemp(prefix="cerbero-serve-bench-")
    tiny().save_pretrained(ckpt)
    build_tokenizer().save_pretrained(ckpt)
    init_ray(ClusterConfig(num_cpus=os.cpu_count(), dashboard=True))
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
        "args": vars(a),
        "model": "tiny (2 layers, hidden 64, vocab 32000)",
    }
    runs = (
        ("continuous", "continuous", a.clients, False),
        ("continuous_stream", "continuous", a.clients, True),
        ("hf_batched", "hf", a.clients, False),
        ("per_request", "hf", 1, False),
    )
    for name, engine, batch, stream in runs:
        c = to_container(
            compose(
                "serve",
                [
                    f"serve.checkpoint={ckpt}",
                    "serve.port=8123",
                    f"serve.engine={engine}",
                    f"serve.max_batch_size={batch}",
                    "serve.batch_wait_timeout_s=0.05",
                    f"serve.max_ongoing_requests={a.clients * 2}",
                    f"serve.max_queued_requests={a.requests * 2}",
                    "serve.cpus_per_replica=1",
                ],
            )
        )
        url = run_serve(c) + "/v1/chat/completions"
        load(url, 8, 8, a.tokens, stream)  # warm-up
        res[name] = load(url, a.requests, a.clients, a.tokens, stream)
        print(name, res[name], flush=True)
        serve.shutdown()
    for name, *_ in runs[:-1]:
        res[f"ratio_{name}"] = round(res[name]["requests_per_s"] / res["per_request"]["requests_per_s"], 2)
    shutdown_ray()
    print(json.dumps(res, indent=1))
    write_results("serve", res)


if __name__ == "__main__":
    main()
