"""Data-stage throughput and fill against the bare tokenizer and HF `datasets`, in one run.

    python bench/bench_data.py                       # 50 MB of novels (10 x the 5 MB corpus)
    python bench/bench_data.py --repeat 4 --skip-hf  # quicker

On the same texts, in this process:
  (a)  the bare fast tokenizer, one batch call: tok(texts) and the Rust encode_batch_fast
  (b)  HF datasets: load_dataset("json") -> map(tokenize, batched) -> map(group_texts) into
       seq_len chunks (documents bleed into each other), num_proc 1 and 2
  ours run_data on an embedded Ray cluster: whole documents, loss masks, position ids, Parquet
Reports tokens/s, ratios, fill at seq_len, and the peak RSS of each (ours: the whole process
tree, Ray's daemons included). Writes bench/results/data-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shutil
import sys
import threading
import time

import psutil

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from _results import write_results  # noqa: E402 (bench/, the script's own folder)

from cerbero_ray.chat import SYSTEM_LINE  # noqa: E402
from cerbero_ray.tokenizer import build_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PeakRSS:
    """Peak summed RSS of this process and its children, sampled every 50 ms."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()

    def _rss(self):
        me = psutil.Process()
        total = me.memory_info().rss
        for c in me.children(recursive=True):
            try:
                total += c.memory_info().rss
            except psutil.Error:
                pass
        return total

    def __enter__(self):
        self.peak = self._rss()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self):
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()

    @property
    def gib(self):
        return round(self.peak / 2**30, 2)


def make_corpus(src: str, dest: str, repeat: int, as_jsonl_from_json: bool = False) -> str:
    if as_jsonl_from_json:
        items = json.load(open(src))
        body = "".join(json.dumps({"messages": r["messages"]}, ensure_ascii=False) + "\n" for r in items).encode()
    else:
        body = open(src, "rb").read()
        body = body if body.endswith(b"\n") else body + b"\n"
    with open(dest, "wb") as f:
        for _ in range(repeat):
            f.write(body)
    return dest


def bench_bare(path: str) -> dict:
    tok = build_tokenizer()
    texts = [json.loads(line)["text"] for line in open(path, encoding="utf-8")]
    out = {}
    for name, fn in (
        ("tok_call", lambda: tok(texts, add_special_tokens=False)["input_ids"]),
        (
            "encode_batch_fast",
            lambda: [e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)],
        ),
    ):
        gc.collect()
        with PeakRSS() as mem:
            t = time.perf_counter()
            ids = fn()
            s = time.perf_counter() - t
        n = sum(len(x) for x in ids)
        out[name] = {"tokens": n, "seconds": round(s, 2), "tokens_per_s": round(n / s), "peak_rss_gib": mem.gib}
        del ids
    return out


def bench_hf(path: str, seq_len: int, num_proc: int | None, cache: str) -> dict:
    import datasets

    datasets.disable_caching()
    tok = build_tokenizer()

    def tokenize(batch):
        return tok(batch["text"])  # BOS per document, as the common recipe does

    def group_texts(batch):
        ids = [t for x in batch["input_ids"] for t in x]
        n = len(ids) // seq_len * seq_len
        return {"input_ids": [ids[i : i + seq_len] for i in range(0, n, seq_len)]}

    with PeakRSS() as mem:
        t = time.perf_counter()
        ds = datasets.load_dataset("json", data_files=path, split="train", cache_dir=cache)
        tokd = ds.map(tokenize, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
        n = sum(len(x) for x in tokd["input_ids"])
        grouped = tokd.map(
            group_texts, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=tokd.column_names
        )
        rows = len(grouped)
        s = time.perf_counter() - t
    return {
        "tokens": n,
        "rows": rows,
        "seconds": round(s, 2),
        "tokens_per_s": round(n / s),
        "peak_rss_gib": mem.gib,
        "fill": 1.0,
        "note": "documents bleed into each other; the tail of every 1000-doc batch is dropped",
    }


def data_config(sources: dict, out: str, seq_len: int, **data) -> dict:
    """A data-stage config (plain dict) for ``sources`` ``{name: {path, format[, weight]}}``."""
    return {
        "paths": {"repo_dir": REPO, "data_dir": os.path.dirname(out), "output_dir": out},
        "data": {
            "sources": {k: {"weight": 1.0, "text_field": "text", **v} for k, v in sources.items()},
            "seq_len": seq_len,
            "loss_on": "assistant",
            "packing": "whole",
            "long_docs": "split",
            "buffer_docs": 4096,
            "workers": None,
            "seed": 0,
            "compression": "zstd",
            "output_dir": out,
            "overwrite": True,
            "dedup": "none",  # the corpus is repeated to size: every copy packed, as (a) and (b) tokenize it
            **data,
        },
        "tokenizer": {"path": None, "assistant_tag": "AI", "system_line": SYSTEM_LINE},
    }


def bench_ours(path: str, out: str, seq_len: int, packing: str, fmt: str, loss_on: str) -> dict:
    from cerbero_ray.data.pipeline import run_data

    shutil.rmtree(out, ignore_errors=True)
    cfg = data_config({"s": {"path": path, "format": fmt}}, out, seq_len, loss_on=loss_on, packing=packing)
    with PeakRSS() as mem:
        t = time.perf_counter()
        m = run_data(cfg)
        s = time.perf_counter() - t
    return {
        "tokens": m["tokens"],
        "rows": m["rows"],
        "seconds": round(s, 2),
        "tokens_per_s": round(m["tokens"] / s),
        "stream_tokens_per_s": m["tokens_per_s"],
        "fill": m["fill"],
        "cut_to_fill": m["cut_to_fill"],
        "peak_rss_gib_tree": mem.gib,
        "documents": m["documents"],
        "packing": packing,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=os.environ.get("CERBERO_DATA_DIR", os.path.join(REPO, "..", "shared", "data")))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--chat-repeat", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--work", default=os.path.join(REPO, ".bench"))
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    novels = make_corpus(
        os.path.join(a.data_dir, "text_it", "it_novels_packing_5MB.jsonl"),
        os.path.join(a.work, "novels.jsonl"),
        a.repeat,
    )
    chat = make_corpus(
        os.path.join(a.data_dir, "chat_it", "eu_it_messages.json"),
        os.path.join(a.work, "chat.jsonl"),
        a.chat_repeat,
        as_jsonl_from_json=True,
    )
    res = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {round(psutil.virtual_memory().total / 2**30)} GiB",
        "novels_mb": round(os.path.getsize(novels) / 1e6, 1),
        "chat_mb": round(os.path.getsize(chat) / 1e6, 1),
        "seq_len": a.seq_len,
    }
    res["a_bare"] = bench_bare(novels)
    print("(a)", res["a_bare"], flush=True)
    if not a.skip_hf:
        for npr in (None, 2):
            res[f"b_hf_num_proc_{npr or 1}"] = bench_hf(novels, a.seq_len, npr, os.path.join(a.work, "hf_cache"))
            print("(b)", npr, res[f"b_hf_num_proc_{npr or 1}"], flush=True)
    from cerbero_ray.config.common import ClusterConfig
    from cerbero_ray.runtime import init_ray

    init_ray(ClusterConfig(num_cpus=os.cpu_count()))
    for packing in ("whole", "split"):
        res[f"ours_novels_{packing}"] = bench_ours(
            novels, os.path.join(a.work, f"out_{packing}"), a.seq_len, packing, "text", "all"
        )
        print("ours", packing, res[f"ours_novels_{packing}"], flush=True)
    res["ours_chat_whole"] = bench_ours(
        chat, os.path.join(a.work, "out_chat"), a.seq_len, "whole", "openai", "assistant"
    )
    print("ours chat", res["ours_chat_whole"], flush=True)
    base = res["a_bare"]["tok_call"]["tokens_per_s"]
    res["ratios"] = {
        k: {
            "vs_a_tok_call": round(v["tokens_per_s"] / base, 3),
            "vs_a_encode_batch_fast": round(v["tokens_per_s"] / res["a_bare"]["encode_batch_fast"]["tokens_per_s"], 3),
            **(
                {
                    "vs_b_best": round(
                        v["tokens_per_s"] / max(res[b]["tokens_per_s"] for b in res if b.startswith("b_")), 3
                    )
                }
                if not a.skip_hf
                else {}
            ),
        }
        for k, v in res.items()
        if k.startswith("ours_novels")
    }
    path = write_results("data", res)
    print(json.dumps(res["ratios"], indent=2), f"\nwritten {path}")


if __name__ == "__main__":
    main()
