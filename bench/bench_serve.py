"""Serving throughput on CPU: dynamic batching vs one request at a time, 32 concurrent clients, one run.

    python bench/bench_serve.py                  # tiny model, 128 requests each way, 32 new tokens each
    python bench/bench_serve.py --requests 64    # quicker

The same app, model and requests, deployed twice on an embedded Ray cluster, one replica each:
  batched      serve.max_batch_size=32: concurrent requests share batched generate passes
  per-request  serve.max_batch_size=1: each request runs its own generate (the baseline)
Clients: 32 threads posting /v1/chat/completions (greedy, max_tokens 32, 8 different prompts).
Reports requests/s, new tokens/s, p50/p95 latency and the throughput ratio.
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
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["Ciao! Come stai?", "Qual è la capitale d'Italia?", "Raccontami una storia breve.", "Che cos'è la fotosintesi?",
           "Come si prepara il caffè?", "Dammi un consiglio per studiare.", "Chi era Dante Alighieri?", "Perché piove?"]


def post(url: str, i: int, tokens: int) -> tuple[float, int, int]:
    body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "max_tokens": tokens, "temperature": 0}
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"}, method="POST")
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
            return time.perf_counter() - t0, r.status, out["usage"]["completion_tokens"]
    except urllib.error.HTTPError as e:
        return time.perf_counter() - t0, e.code, 0


def load(url: str, n: int, clients: int, tokens: int) -> dict:
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: post(url, i, tokens), range(n)))
    wall = time.perf_counter() - t0
    lat = sorted(r[0] for r in results)
    return {"requests_per_s": round(n / wall, 2), "new_tokens_per_s": round(sum(r[2] for r in results) / wall, 1),
            "p50_s": round(statistics.median(lat), 3), "p95_s": round(lat[int(0.95 * (len(lat) - 1))], 3),
            "errors": sum(r[1] != 200 for r in results), "wall_s": round(wall, 1)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--tokens", type=int, default=32)
    a = p.parse_args()

    from ray import serve

    from cerbero_ray.config import compose, to_container
    from cerbero_ray.models import tiny
    from cerbero_ray.runtime import init_ray, shutdown_ray
    from cerbero_ray.serve.service import run_serve
    from cerbero_ray.tokenizer import build_tokenizer

    ckpt = tempfile.mkdtemp(prefix="cerbero-serve-bench-")
    tiny().save_pretrained(ckpt)
    build_tokenizer().save_pretrained(ckpt)
    init_ray({"num_cpus": os.cpu_count(), "dashboard": True})
    res = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, no GPU",
           "args": vars(a), "model": "tiny (2 layers, hidden 64, vocab 32000)"}
    for name, batch in (("batched", a.clients), ("per_request", 1)):
        c = to_container(compose("serve", [f"serve.checkpoint={ckpt}", "serve.port=8123", f"serve.max_batch_size={batch}",
                                           "serve.batch_wait_timeout_s=0.05", f"serve.max_ongoing_requests={a.clients * 2}",
                                           f"serve.max_queued_requests={a.requests * 2}", "serve.cpus_per_replica=1"]))
        url = run_serve(c) + "/v1/chat/completions"
        load(url, 8, 8, a.tokens)  # warm-up
        res[name] = load(url, a.requests, a.clients, a.tokens)
        print(name, res[name], flush=True)
        serve.shutdown()
    res["throughput_ratio"] = round(res["batched"]["requests_per_s"] / res["per_request"]["requests_per_s"], 2)
    shutdown_ray()
    print(json.dumps(res, indent=1))
    os.makedirs(os.path.join(REPO, "bench", "results"), exist_ok=True)
    with open(os.path.join(REPO, "bench", "results", f"serve-{res['date']}.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
