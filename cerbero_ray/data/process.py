"""One packing buffer, start to finish: raw rows → documents → tokens + loss masks → packed rows →
a Parquet shard, a rejects file and a stats record. No Ray here: the pipeline maps this over the
stream, and tests and benchmarks call it directly.

Raw rows carry ``source`` (the config's source name), ``path``, ``line_no``, ``kind`` and ``raw``
(bytes): ``jsonl`` a JSON line, ``record`` one JSON object, ``txt`` a whole text file,
``unreadable`` what the reader could not read (the error, as text).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from cerbero_ray import storage
from cerbero_ray.config.common import TokenizerConfig
from cerbero_ray.config.data import DataConfig
from cerbero_ray.data.dedup import DropList, read_duplicates
from cerbero_ray.data.formats import Document, Reject, parse_raw
from cerbero_ray.data.packing import IGNORE_INDEX, best_fit_decreasing, build_rows, sequential_fill, split_long
from cerbero_ray.tokenizer import build_tokenizer, encode_chats, encode_plain

ROW_GROUP_ROWS = 16  # rows per Parquet row group (~1.5 MB at seq 8192)

MAX_REJECT_BYTES = 1 << 20  # a rejected row is kept whole up to 1 MiB, and its length always
DUPLICATE_BYTES = 1 << 10  # a dedup drop's first KiB: its file and line hold it all (a duplicate's copy is trained on)


def copies(weight: float, seed: int, key: str) -> int:
    """How many times a document of a source with ``weight`` is used: ⌊w⌋, plus one more with
    probability frac(w), decided by a hash of (seed, key) so that reruns agree."""
    whole, frac = int(math.floor(weight)), weight - math.floor(weight)
    if frac == 0:
        return whole
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "little") / 2**64
    return whole + (u < frac)


BUFFERS = "buffers"  # <key>.json per buffer done: its stats, written after its shard and rejects file


class BufferProcessor:
    """Callable on a batch of raw rows (a dict of numpy arrays); returns one stats record.

    ``cfg``: the data config (its sources typed, as ``check_data`` leaves them); ``threads``: the
    tokenizer's thread pool (0: its default); ``duplicates``: the table of rows to drop that the
    stage's deduplication pass wrote ("": none).
    """

    def __init__(self, cfg: DataConfig, tokenizer: TokenizerConfig, threads: int = 0, duplicates: str = ""):
        self.cfg = cfg
        self.drops = DropList(read_duplicates(duplicates) if duplicates else None)
        if threads:  # the tokenizer's Rust thread pool; read when it first starts
            os.environ.setdefault("RAYON_NUM_THREADS", str(threads))
        self.tok = build_tokenizer(tokenizer.path, tokenizer.assistant_tag, tokenizer.system_line)
        self.sources = cfg.sources
        self.seq_len = cfg.seq_len
        self.assistant_only = cfg.loss_on == "assistant"

    # -- tokenize ------------------------------------------------------------------------------
    def _tokenize(self, docs: list[Document]) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list[Any] = [None] * len(docs)
        text_idx = [i for i, d in enumerate(docs) if d.text is not None]
        chat_idx = [i for i, d in enumerate(docs) if d.messages is not None]
        bos, eos = self.tok.bos_token_id, self.tok.eos_token_id
        if text_idx:
            for i, e in zip(text_idx, encode_plain(self.tok, [docs[i].text for i in text_idx])):
                ids = np.empty(len(e) + 2, dtype=np.int32)
                ids[0], ids[1:-1], ids[-1] = bos, e, eos
                out[i] = (ids, ids.copy())
        if chat_idx:
            for i, ids, mask in zip(chat_idx, *encode_chats(self.tok, [docs[i].messages for i in chat_idx])):
                ids = np.asarray(ids, dtype=np.int32)
                labels = (
                    np.where(np.asarray(mask, dtype=bool), ids, IGNORE_INDEX).astype(np.int32)
                    if self.assistant_only
                    else ids.copy()
                )
                out[i] = (ids, labels)
        return out

    # -- the whole buffer ----------------------------------------------------------------------
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        n = len(batch["raw"])
        key = hashlib.sha1(f"{batch['path'][0]}:{batch['line_no'][0]}:{n}".encode()).hexdigest()[:16]
        done = storage.join(self.cfg.output_dir, BUFFERS, f"{key}.json")
        try:  # done by an earlier, unfinished run of this config on these files (the stage resumed it)
            return {k: [v] for k, v in storage.read_json(done).items()}
        except (FileNotFoundError, ValueError):
            pass
        stats: dict[str, Any] = {
            "key": key,
            "input_rows": n,
            "input_bytes": 0,
            "documents": 0,
            "split_documents": 0,
            "split_pieces": 0,
            "dropped_long": 0,
        }
        rejects, reasons, per_source = [], Counter(), Counter()
        docs, origins = [], []
        drops = self.drops.for_batch(batch["path"])
        for source, path, line_no, kind, raw in zip(
            batch["source"], batch["path"], batch["line_no"], batch["kind"], batch["raw"]
        ):
            raw = bytes(raw) if raw is not None else b""
            stats["input_bytes"] += len(raw)
            if drop := drops.get((source, path, int(line_no))):
                reasons[drop[0]] += 1
                rejects.append(self._reject_row(source, path, line_no, raw, Reject(*drop), DUPLICATE_BYTES))
                continue
            try:
                src = self.sources[source]
                doc = parse_raw(kind, raw, src.format, src.text_field)
            except Exception as e:  # Reject, or anything a row can still break: one row never stops the job
                r = e if isinstance(e, Reject) else Reject("unreadable", f"{type(e).__name__}: {str(e)[:200]}")
                reasons[r.reason] += 1
                rejects.append(self._reject_row(source, path, line_no, raw, r))
                continue
            for _ in range(copies(self.sources[source].weight, self.cfg.seed, f"{source}:{path}:{line_no}")):
                docs.append(doc)
                origins.append((source, path, int(line_no), raw))
        pieces, piece_sources = [], []
        for (ids, labels), (source, path, line_no, raw) in zip(self._tokenize(docs), origins):
            if len(ids) > self.seq_len:
                if self.cfg.long_docs == "drop":
                    stats["dropped_long"] += 1
                    reasons["too_long"] += 1
                    rejects.append(
                        self._reject_row(
                            source,
                            path,
                            line_no,
                            raw,
                            Reject("too_long", f"{len(ids)} tokens > seq_len {self.seq_len}"),
                        )
                    )
                    continue
                parts = split_long(ids, labels, self.seq_len)
                stats["split_documents"] += 1
                stats["split_pieces"] += len(parts)
                pieces.extend(parts)
                piece_sources += [source] * len(parts)
            else:
                pieces.append((ids, labels))
                piece_sources.append(source)
            stats["documents"] += 1
            per_source[source] += 1
        stats.update(
            self._write(pieces, piece_sources, key),
            rejected=sum(reasons.values()),
            reject_reasons=json.dumps(dict(reasons)),
            per_source=json.dumps(dict(per_source)),
        )
        stats["rejects_path"] = self._write_rejects(rejects, key)
        storage.write_json(done, stats)  # last: the buffer counts as done once its files are all there
        return {k: [v] for k, v in stats.items()}

    def _reject_row(self, source, path, line_no, raw: bytes, r: Reject, keep: int = MAX_REJECT_BYTES) -> dict:
        return {
            "source": source,
            "path": path,
            "line_no": int(line_no),
            "reason": r.reason,
            "detail": r.detail,
            "raw_bytes": len(raw),
            "raw": raw[:keep].decode("utf-8", errors="replace"),
        }

    def _write(self, pieces: list[tuple[np.ndarray, np.ndarray]], sources: list[str], key: str) -> dict:
        empty = {"shard": "", "rows": 0, "tokens": 0, "cut_to_fill": 0, "loss_tokens": 0, "padding": 0}
        if not pieces:
            return empty
        lengths = [len(p[0]) for p in pieces]
        if self.cfg.packing == "whole":
            bins = best_fit_decreasing(lengths, self.seq_len)
        else:
            bins = sequential_fill(lengths, self.seq_len)
        rows = build_rows(pieces, bins, self.seq_len, self.tok.pad_token_id)
        perm = np.random.default_rng([self.cfg.seed, int(key, 16) & 0xFFFFFFFF]).permutation(len(bins))
        table = pa.table(
            {
                "input_ids": _fixed(rows.input_ids[perm]),
                "labels": _fixed(rows.labels[perm]),
                "position_ids": _fixed(rows.position_ids[perm]),
                "num_docs": pa.array(rows.num_docs[perm]),
                # per packed piece: its source and its tokens (what the source-mix report reads)
                "doc_sources": pa.array([[str(sources[d]) for d, _, _ in bins[i]] for i in perm]),
                "doc_tokens": pa.array([[b - a for _, a, b in bins[i]] for i in perm], pa.list_(pa.int32())),
            }
        )
        shard = storage.join(self.cfg.output_dir, "shards", f"shard-{key}.parquet")
        with storage.open_output(shard) as f:
            # small row groups: the trainer reads any run of rows without decoding the whole shard
            pq.write_table(table, f, compression=self.cfg.compression, row_group_size=ROW_GROUP_ROWS)
        tokens = int(sum(len(p[0]) for p in pieces))
        cut = sum(1 for b in bins for _, start, stop in b if start > 0)
        return {
            "shard": shard,
            "rows": len(bins),
            "tokens": tokens,
            "cut_to_fill": cut,
            "loss_tokens": int((rows.labels != IGNORE_INDEX).sum()),
            "padding": int(rows.padding),
        }

    def _write_rejects(self, rejects: list[dict], key: str) -> str:
        if not rejects:
            return ""
        path = storage.join(self.cfg.output_dir, "rejects", f"rejects-{key}.jsonl")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects)
        return storage.write_bytes(path, text.encode("utf-8", "backslashreplace"))


def _fixed(a: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])
