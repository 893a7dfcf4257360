"""Document deduplication: which input rows repeat an earlier one, exactly or nearly.

A repeated document is trained on twice (or a hundred times: a scraped page, a self-chat seed
sampled again), which weights it above the rest and teaches the model to recite it. The data stage
finds them in a pass over every source before any buffer is packed (``data.dedup``):

* ``exact``: the same text after Unicode NFKC, lower case and collapsed whitespace (a chat: its
  roles and contents). One 64-bit hash per document.
* ``near``: exact, plus MinHash-LSH over word 5-grams (112 32-bit hashes in 14 bands of 8:
  datatrove's ``MinhashConfig`` defaults): two documents whose 5-gram sets overlap by Jaccard 0.8
  share a band with probability 0.92, by 0.5 with 0.05. Documents that share a band are one
  cluster (connected components: a chain of near copies is one cluster too).

Of each cluster the first row in the config's order (source, then file, then line) is kept; the
others become ``duplicate`` / ``near_duplicate`` rejects naming it. The outcome depends on the
inputs only, never on how rows were batched or which worker saw them first, so reruns agree.

:class:`Fingerprints` is the pass's per-batch function (no Ray); :func:`find_duplicates` turns the
fingerprints of the whole input into the table of rows to drop, which every packing actor reads.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cerbero_ray import storage
from cerbero_ray.data.formats import Document, parse_raw

MODES = ("none", "exact", "near")
NGRAM = 5  # words per shingle
BANDS, ROWS = 14, 8  # MinHash-LSH: BANDS bands of ROWS hashes each
_rng = np.random.default_rng(0x5EED)  # fixed: which rows are duplicates depends on the inputs only
_MUL = _rng.integers(1, 2**32, BANDS * ROWS, dtype=np.uint32) | np.uint32(1)  # odd: a bijection of uint32
_ADD = _rng.integers(0, 2**32, BANDS * ROWS, dtype=np.uint32)
_POLY = np.uint64(1_000_003)  # shingle hash: a polynomial of its words' hashes, mod 2**64
_WORD = re.compile(r"\w{1,32}")  # a word (a longer one is read as pieces of 32 characters)
_PLACE = _rng.integers(1, 2**63, 32, dtype=np.uint64) | np.uint64(1)  # a word's hash: its characters' places
_SEGMENT = 1 << 20  # characters read into words at a time
_CHUNK = 8192  # shingles per step of the MinHash (its temporary: 112 x 8192 uint32 = 3.7 MB)


def normalized(doc: Document) -> str:
    """The text two documents must share to be exact duplicates."""
    if doc.text is not None:
        parts = [doc.text]
    else:
        parts = [f"{m['role']}: {m['content']}" for m in doc.messages]
    return "\n".join(" ".join(unicodedata.normalize("NFKC", p).lower().split()) for p in parts)


def _h64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def exact_hash(text: str) -> int:
    return _h64(text.encode("utf-8", "surrogatepass"))


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: a well-spread uint64 from a structured one (the polynomial hashes
    below are linear; MinHash wants its inputs to look random)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def word_hashes(text: str) -> np.ndarray:
    """A uint64 per word of ``text``, read a segment of ``_SEGMENT`` characters at a time (cut at a
    space or a newline): a whole book in one document never holds more than one segment's words
    as strings."""
    out, start = [], 0
    while start < len(text):
        end = start + _SEGMENT
        if end < len(text):
            cut = max(text.rfind(" ", start, end), text.rfind("\n", start, end))  # normalized: no other space
            end = cut + 1 if cut > start else end
        words = _WORD.findall(text, start, end)
        if words:  # every word at once: its code points (UCS-4, zero-padded) times a multiplier per place
            codes = np.array(words).view(np.uint32).reshape(len(words), -1).astype(np.uint64)
            with np.errstate(over="ignore"):
                out.append(_mix((codes * _PLACE[: codes.shape[1]]).sum(axis=1)))
        start = end
    return np.concatenate(out) if out else np.zeros(0, np.uint64)


def word_runs(w: np.ndarray, lengths) -> np.ndarray:
    """The hash of every run of ``n`` words for each ``n`` of ``lengths`` (``w``: the words' hashes),
    all in one array: the runs' polynomials (:func:`grams` mixes them; for set membership the
    words' own hashes are spread enough), built in one pass: a run's is that of its first ``n - 1``
    words times ``_POLY`` plus its last word's hash."""
    wanted, parts = set(lengths), []
    acc = np.zeros(len(w), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for n in range(1, min(max(wanted, default=0), len(w)) + 1):
            acc = acc[: len(w) - n + 1] * _POLY + w[n - 1 :]
            if n in wanted:
                parts.append(acc)
    return np.concatenate(parts) if parts else np.zeros(0, np.uint64)


def grams(w: np.ndarray, n: int) -> np.ndarray:
    """The well-spread uint64 hash of every run of ``n`` words (``w``: their hashes); none when
    there are fewer than ``n`` words."""
    return _mix(word_runs(w, [n]))


def _bands(w: np.ndarray) -> np.ndarray | None:
    if not len(w):
        return None
    # a text shorter than a shingle is one shingle; 32 bits: twice the MinHash speed of 64
    shingles = (grams(w, min(NGRAM, len(w))) >> np.uint64(32)).astype(np.uint32)
    sig = np.full(BANDS * ROWS, np.iinfo(np.uint32).max, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for s in range(0, len(shingles), _CHUNK):
            part = shingles[None, s : s + _CHUNK]
            sig = np.minimum(sig, (_MUL[:, None] * part + _ADD[:, None]).min(axis=1))
    return np.array([_h64(b.tobytes()) for b in sig.reshape(BANDS, ROWS)], dtype=np.uint64)


def band_hashes(text: str) -> np.ndarray | None:
    """The ``BANDS`` LSH keys of a normalized text (uint64), or None when it has no word."""
    return _bands(word_hashes(text))


class Fingerprints:
    """Callable on a batch of raw rows (the data stage's ``source, path, line_no, kind, raw``):
    the fingerprint of every row that parses as a document (rows that do not are rejected by the
    packing pass, with their reason). ``sources``: the data config's typed sources; ``mode``:
    ``data.dedup``; ``evals``: per evaluation set, its runs of words by length ({words: sorted
    hashes of :func:`word_runs`}, from :func:`cerbero_ray.data.decontaminate.eval_grams`), whose
    rows holding one are marked (``contaminated``: the set's index, -1 for none). A Ray Data actor:
    the sets come once."""

    def __init__(self, sources: dict, mode: str, evals: list[dict[int, np.ndarray]] | None = None):
        if mode not in MODES:
            raise ValueError(f"data.dedup must be one of {MODES}, got {mode!r}")
        self.sources, self.near = sources, mode == "near"
        self.lengths = sorted({n for e in evals or [] for n, g in e.items() if len(g)})
        # each set's runs of every length in one sorted array, and a bitmap of all of them (a bit
        # per low bits of a hash, ~16 bits per run): a document's runs are looked up in the sets
        # only where the bitmap has them, a few in a thousand (a binary search of every run in
        # a large array cost 4x the rest of the check)
        self.evals = [np.unique(np.concatenate([np.zeros(0, np.uint64), *e.values()])) for e in evals or []]
        every = np.concatenate([np.zeros(0, np.uint64), *self.evals])
        self.bits = int(np.clip(np.ceil(np.log2(max(len(every), 1) * 16)), 16, 30))
        self.bitmap = np.zeros(1 << (self.bits - 3), np.uint8)
        slot = every & np.uint64((1 << self.bits) - 1)
        np.bitwise_or.at(
            self.bitmap, (slot >> np.uint64(3)).astype(np.int64), (1 << (slot & np.uint64(7))).astype(np.uint8)
        )

    def _contaminated(self, w: np.ndarray) -> int:
        runs = word_runs(w, self.lengths)
        slot = runs & np.uint64((1 << self.bits) - 1)
        hit = (self.bitmap[(slot >> np.uint64(3)).astype(np.int64)] >> (slot & np.uint64(7)).astype(np.uint8)) & 1
        runs = runs[hit.astype(bool)]
        if len(runs):
            for i, e in enumerate(self.evals):
                if (e[np.minimum(np.searchsorted(e, runs), len(e) - 1)] == runs).any():
                    return i
        return -1

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        keep, exact, bands, dirty = [], [], [], []
        for i, (source, kind, raw) in enumerate(zip(batch["source"], batch["kind"], batch["raw"])):
            src = self.sources[source]
            try:
                text = normalized(parse_raw(kind, bytes(raw or b""), src.format, src.text_field))
            except Exception:  # noqa: BLE001 - a row that breaks is the packing pass's reject to count
                continue
            keep.append(i)
            exact.append(exact_hash(text))
            w = word_hashes(text) if self.near or self.evals else None
            if self.near:
                b = _bands(w)
                bands.append(np.zeros(BANDS + 1, np.uint64) if b is None else np.r_[b, np.uint64(1)])
            if self.evals:
                dirty.append(self._contaminated(w))
        out = {k: np.asarray(batch[k])[keep] for k in ("source", "path", "line_no")}
        out["exact"] = np.array(exact, dtype=np.uint64)
        if self.near:  # the last column says whether the row has bands (a text of no word has none)
            out["bands"] = np.stack(bands) if bands else np.zeros((0, BANDS + 1), np.uint64)
        if self.evals:
            out["contaminated"] = np.array(dirty, dtype=np.int16)
        return out


def _same_key_edges(key: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Edges (row, first row of its key) among ``rows`` (indices in priority order) by ``key``."""
    order = rows[np.argsort(key[rows], kind="stable")]
    k = key[order]
    same = np.zeros(len(order), bool)
    same[1:] = k[1:] == k[:-1]
    first = np.maximum.accumulate(np.where(same, 0, np.arange(len(order))))
    return order[same], order[first[same]]


class FileIds:
    """(source, path) -> a small int, and each one's place in the config's order (``planned``: every
    source's files, in order); a pair not planned (never expected) goes after them, by name.
    ``compact`` turns a batch of :class:`Fingerprints` into ``file`` ids: the driver holds 4 bytes
    per document for where it comes from, not two strings."""

    def __init__(self, planned: list[tuple[str, str]]):
        self.names = list(dict.fromkeys(planned))
        self.ids = {k: i for i, k in enumerate(self.names)}
        self.planned = len(self.names)

    def _id(self, key: tuple[str, str]) -> int:
        if key not in self.ids:
            self.ids[key] = len(self.names)
            self.names.append(key)
        return self.ids[key]

    def compact(self, fp: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = {k: v for k, v in fp.items() if k not in ("source", "path")}
        if "bands" in out:  # a batch of no document may come back from Ray Data without its second axis
            out["bands"] = np.asarray(out["bands"], np.uint64).reshape(-1, BANDS + 1)
        out["file"] = np.fromiter(map(self._id, zip(fp["source"], fp["path"])), np.int32, len(fp["source"]))
        return out

    def ranks(self) -> np.ndarray:
        extra = sorted(range(self.planned, len(self.names)), key=lambda i: self.names[i])
        rank = np.arange(len(self.names))
        rank[extra] = np.arange(self.planned, len(self.names))
        return rank


def find_duplicates(fp: dict[str, np.ndarray], files: FileIds, evals: list[str] = ()) -> pa.Table:
    """The rows to drop, from the whole input's fingerprints ``fp`` (batches of :class:`Fingerprints`
    compacted by ``files`` and concatenated: ``file``, ``line_no``, ``exact``[, ``bands``,
    ``contaminated``]): one row per duplicate with ``reason`` and the kept row it repeats
    (``of_*``), and one per row sharing a passage with the evaluation set ``evals[i]``
    (``contaminated``, ``of_path`` the set). A contaminated row is no cluster's kept row: a copy of
    it that shares no passage itself is kept."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    file = np.asarray(fp["file"], np.int64)
    order = np.lexsort((np.asarray(fp["line_no"], np.int64), files.ranks()[file]))  # priority: config order
    cols = {k: np.asarray(v)[order] for k, v in fp.items()}
    n = len(order)
    everyone = np.arange(n)
    dirty = cols["contaminated"] if "contaminated" in cols else np.full(n, -1, np.int16)
    clean = everyone[dirty < 0]
    edges = [_same_key_edges(cols["exact"], clean)]
    if "bands" in cols and n:
        banded = clean[cols["bands"][clean, BANDS] == 1]
        edges += [_same_key_edges(cols["bands"][:, b], banded) for b in range(BANDS)]
    u, v = (np.concatenate(side) for side in zip(*edges))
    _, label = connected_components(coo_matrix((np.ones(len(u)), (u, v)), shape=(n, n)), directed=False)
    first = np.full(label.max() + 1 if n else 0, n, dtype=np.int64)
    np.minimum.at(first, label, everyone)  # a cluster's kept row: its first in priority order
    kept = first[label]
    dup = np.flatnonzero(kept != everyone)
    of = kept[dup]
    reason = np.where(cols["exact"][dup] == cols["exact"][of], "duplicate", "near_duplicate")
    bad = np.flatnonzero(dirty >= 0)
    rows = np.concatenate([dup, bad])
    names = [*files.names, *(("evaluation", e) for e in evals)]
    of_ids = np.concatenate([cols["file"][of], len(files.names) + dirty[bad].astype(np.int64)])

    def named(ids, i):  # source (i=0) or path (1) of each row (dictionary-encoded: few files, many rows)
        return pa.DictionaryArray.from_arrays(pa.array(ids, pa.int32()), pa.array([x[i] for x in names], pa.string()))

    return pa.table(
        {
            "source": named(cols["file"][rows], 0),
            "path": named(cols["file"][rows], 1),
            "line_no": pa.array(cols["line_no"][rows], pa.int64()),
            "reason": pa.array([*reason.tolist(), *["contaminated"] * len(bad)], pa.string()),
            "of_source": named(of_ids, 0),
            "of_path": named(of_ids, 1),
            "of_line_no": pa.array(np.concatenate([cols["line_no"][of], np.full(len(bad), -1)]), pa.int64()),
        }
    )


class DropList:
    """The duplicates table, asked per batch: ``for_batch(paths)`` gives
    {(source, path, line_no): (reason, detail)} for the rows of those files to drop. The table's
    rows are grouped by file once: a batch looks up its own files, never scans the whole table."""

    def __init__(self, table: pa.Table | None):
        self.table, self.rows = table, {}
        meta = duplicates_meta(table) if table is not None else {}
        self.ngram, self.min_words = meta.get("ngram"), meta.get("min_words", meta.get("ngram"))
        if table is None or not table.num_rows:
            return
        col = table["path"].combine_chunks()
        if not pa.types.is_dictionary(col.type):
            col = pc.dictionary_encode(col)
        codes = col.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        starts = np.searchsorted(codes[order], np.arange(len(col.dictionary) + 1))
        for i, name in enumerate(col.dictionary.to_pylist()):
            if starts[i] < starts[i + 1]:
                self.rows[name] = order[starts[i] : starts[i + 1]]

    def for_batch(self, paths) -> dict[tuple[str, str, int], tuple[str, str]]:
        picked = [self.rows[p] for p in set(paths) if p in self.rows]
        if not picked:
            return {}
        t = self.table.take(pa.array(np.concatenate(picked)))
        return {(r["source"], r["path"], r["line_no"]): (r["reason"], self._detail(r)) for r in t.to_pylist()}

    def _detail(self, r: dict) -> str:
        if r["reason"] == "contaminated":
            whole = (
                f" (or one of its texts of {self.min_words} to {self.ngram - 1} words whole)"
                if self.min_words and self.ngram and self.min_words < self.ngram
                else ""
            )
            return f"shares a passage of {self.ngram} words{whole} with the evaluation set {r['of_path']}"
        same = "same text" if r["reason"] == "duplicate" else "nearly the same words"
        return f"{same} as {r['of_source']} {r['of_path']}:{r['of_line_no']} (kept)"


def write_duplicates(table: pa.Table, path: str, **meta) -> str:
    """The duplicates table at ``path`` (local or a URI), with ``meta`` (the pass's counts) in its
    schema metadata: a resumed run reads it back instead of fingerprinting again."""
    table = table.replace_schema_metadata({"cerbero": json.dumps(meta)})
    with storage.open_output(path) as f:
        pq.write_table(table, f, compression="zstd")
    return path


def read_duplicates(path: str) -> pa.Table:
    fs, p = storage.resolve(path)
    with storage.naming(path, "reading"):
        return pq.read_table(p, filesystem=fs)


def duplicates_meta(table: pa.Table) -> dict:
    return json.loads((table.schema.metadata or {}).get(b"cerbero", b"{}"))
