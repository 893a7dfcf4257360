"""``manifest.json``: what a data run produced, for the trainer's checks and for people.

The trainer reads ``seq_len``, ``tokenizer_hash`` and ``shards`` from it; every count a user may
ask about (documents in/out, tokens, loss tokens, padding, fill, rejects by reason, split or
dropped documents) is here too.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict

from cerbero_ray import storage
from cerbero_ray.config.data import DataStageConfig
from cerbero_ray.shards import COLUMNS, MANIFEST_VERSION, read_manifest, write_manifest  # noqa: F401 (the stage's API)
from cerbero_ray.tokenizer import build_tokenizer, tokenizer_hash

SUM_KEYS = (
    "input_rows",
    "documents",
    "rows",
    "tokens",
    "loss_tokens",
    "padding",
    "rejected",
    "split_documents",
    "split_pieces",
    "dropped_long",
    "cut_to_fill",
    "input_bytes",
)


def config_hash(cfg: DataStageConfig) -> str:
    """Hash of what determines the shards: the data config (minus where it is written) and the tokenizer."""
    data = {k: v for k, v in asdict(cfg.data).items() if k not in ("output_dir", "overwrite", "workers")}
    if not data["decontaminate"]["paths"]:  # off: its settings shape nothing
        del data["decontaminate"]
    blob = json.dumps({"data": data, "tokenizer": asdict(cfg.tokenizer)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_manifest(stats: list[dict], cfg: DataStageConfig, plans, seconds: float, dedup: dict | None = None) -> dict:
    d, t = cfg.data, cfg.tokenizer
    totals = {k: int(sum(s[k] for s in stats)) for k in SUM_KEYS}
    reasons, per_source = Counter(), Counter()
    for s in stats:
        reasons.update(json.loads(s["reject_reasons"]))
        per_source.update(json.loads(s["per_source"]))
    seq_len = d.seq_len
    capacity = totals["rows"] * seq_len
    return {
        "version": MANIFEST_VERSION,
        "seq_len": seq_len,
        "tokenizer_hash": tokenizer_hash(build_tokenizer(t.path, t.assistant_tag, t.system_line)),
        "config_hash": config_hash(cfg),
        "seed": d.seed,
        "loss_on": d.loss_on,
        "packing": d.packing,
        "columns": list(COLUMNS),
        **totals,
        "fill": round(totals["tokens"] / capacity, 6) if capacity else 0.0,
        "rejects_by_reason": dict(sorted(reasons.items())),
        "dedup": dedup or {"mode": "none"},  # the pass's counts (its duplicates are rejects too)
        "documents_by_source": dict(per_source),
        "sources": {
            p.name: {
                "files": p.files,
                "format": p.format,
                "bytes": p.bytes,
                "stamp": p.stamp,  # its files' sizes and modification times
                "weight": d.sources[p.name].weight,
                "skipped_files": p.skipped,  # files of the source's folder not read, with why
            }
            for p in plans
        },
        "shards": [
            {"path": _absolute(s["shard"]), "rows": int(s["rows"]), "tokens": int(s["tokens"])}
            for s in stats
            if s["shard"]
        ],
        "rejects_files": [_absolute(s["rejects_path"]) for s in stats if s["rejects_path"]],
        "seconds": round(seconds, 2),
        "tokens_per_s": round(totals["tokens"] / seconds) if seconds else None,
        "config": {"data": asdict(d), "tokenizer": asdict(t)},
    }


def format_summary(m: dict, out: str) -> str:
    rej = ", ".join(f"{k}={v}" for k, v in m["rejects_by_reason"].items()) or "none"
    lines = [
        "── data ─────────────────────────────────────────────────────",
        f" output        {out}",
        f" shards        {len(m['shards'])} files, {m['rows']:,} rows × {m['seq_len']} tokens",
        f" documents     {m['documents']:,} packed from {m['input_rows']:,} input rows "
        f"({', '.join(f'{k}: {v:,}' for k, v in m['documents_by_source'].items())})",
        f" tokens        {m['tokens']:,} ({m['loss_tokens']:,} with loss, loss on {m['loss_on']}), "
        f"padding {m['padding']:,}",
        f" fill          {100 * m['fill']:.2f}%  (packing {m['packing']}; cut to fill {m['cut_to_fill']:,})",
        f" long docs     split {m['split_documents']:,} (into {m['split_pieces']:,}), dropped {m['dropped_long']:,}",
        f" rejected      {m['rejected']:,} ({rej})" + (f" -> {out}/rejects/" if m["rejected"] else ""),
        *_dedup_lines(m),
        *_skipped_lines(m),
        f" speed         {m['tokens_per_s'] or 0:,} tokens/s over {m['seconds']} s",
        f" manifest      {storage.join(out, 'manifest.json')}",
        "─────────────────────────────────────────────────────────────",
    ]
    return "\n".join(lines)


def _dedup_lines(m: dict) -> list[str]:
    x = m.get("dedup") or {"mode": "none"}
    lines = []
    if x["mode"] == "none":
        lines.append(" dedup         off (data.dedup=none)")
    else:
        near = f", {x['near_duplicates']:,} near" if x["mode"] == "near" else ""
        lines.append(
            f" dedup         {x['duplicates']:,} exact{near} duplicate(s) of {x['documents']:,} documents dropped "
            f"(data.dedup={x['mode']}, {x['seconds']} s)"
        )
    if x.get("evaluation_sets"):
        sets = ", ".join(f"{os.path.basename(p)}: {n:,}" for p, n in x["evaluation_sets"].items())
        n, words, whole = x["contaminated"], x["ngram"], x.get("min_words", x["ngram"])
        also = f" or holding a text of {whole}+ words" if whole < words else ""
        lines.append(
            f" contaminated  {n:,} document(s) sharing {words} words{also} with an evaluation set ({sets}) dropped"
        )
    return lines


def _skipped_lines(m: dict) -> list[str]:
    from cerbero_ray.inputs import describe_skipped

    skipped = [f for src in m["sources"].values() for f in src.get("skipped_files", [])]
    return [f" skipped       {describe_skipped(skipped)} (manifest: sources.*.skipped_files)"] if skipped else []


def _absolute(path: str) -> str:
    """A local path made absolute (a relative data.output_dir would otherwise tie the manifest to
    the folder the job ran from); URIs as they are."""
    return path if storage.is_uri(path) else storage.resolve(path)[1]
