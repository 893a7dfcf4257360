"""Decontamination: training documents that share a passage with an evaluation set.

A model trained on the test set's own text scores what it memorised, not what it learnt; Italian
web text holds SQuAD-it's Wikipedia paragraphs, and a self-chat model may have seen them too.
``data.decontaminate.paths`` names the evaluation files; every training document that shares a
run of ``data.decontaminate.ngram`` words (13, as GPT-3's contamination study; after the same
normalization as ``data.dedup``: NFKC, lower case, words) with any text in them is dropped as a
``contaminated`` reject naming the file. The check runs in the dedup pass
(:class:`cerbero_ray.data.dedup.Fingerprints`), with or without deduplication.

What counts as a text of an evaluation file: every string of a JSON file (SQuAD's contexts,
questions and answers), every string of each line of a JSON Lines file, every line of anything
else (CSV/TSV: a row, its id and labels included, which only add n-grams no document has). A
text shorter than ``ngram`` words is not checked (lower ``ngram`` for short-text sets such as
tweets: their n-grams then also match more ordinary Italian).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import numpy as np

from cerbero_ray import inputs, storage
from cerbero_ray.data.dedup import grams, normalized, word_hashes
from cerbero_ray.data.formats import Document


def eval_stamp(paths: list[str]) -> str:
    """A hash of the evaluation files' sizes and modification times ("" for none): a finished run
    checked against other contents is not up to date. ``FileNotFoundError`` / ``ValueError`` naming
    the key for a file that is not there or is a folder."""
    if not paths:
        return ""
    seen = []
    for i, path in enumerate(paths):
        fs, p = storage.resolve(path)
        info = fs.get_file_info(p)
        key = f"data.decontaminate.paths[{i}]"
        if info.type == storage.pafs.FileType.NotFound:
            raise FileNotFoundError(f"{key}: no such file: {path}")
        if info.type != storage.pafs.FileType.File:
            raise ValueError(f"{key}: {path} is a folder; name the evaluation files in it")
        seen.append([path, info.size, info.mtime_ns])
    return hashlib.sha256(json.dumps(seen).encode()).hexdigest()[:16]


def _strings(obj) -> Iterator[str]:
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def eval_texts(path: str) -> Iterator[str]:
    """The texts of one evaluation file (local or a URI; compressed or not)."""
    fs, p = storage.resolve(path)
    with storage.naming(path, "reading"), fs.open_input_file(p) as f:
        data = inputs.to_utf8(inputs.decompressed(f).read()).decode("utf-8", "replace")
    suffix = inputs.format_suffix(path)
    if suffix == ".json":
        try:
            yield from _strings(json.loads(data))
            return
        except (ValueError, RecursionError):
            pass  # JSON Lines under a .json name: line by line
    for line in data.splitlines():
        if suffix in (".json", ".jsonl"):
            try:
                yield from _strings(json.loads(line))
                continue
            except (ValueError, RecursionError):
                pass
        yield line


def eval_grams(paths: list[str], ngram: int) -> list[np.ndarray]:
    """Per evaluation file, the sorted hashes of its texts' word ``ngram``-grams."""
    out = []
    for path in paths:
        parts = [grams(word_hashes(normalized(Document(text=t))), ngram) for t in eval_texts(path)]
        out.append(np.unique(np.concatenate(parts)) if parts else np.zeros(0, np.uint64))
    return out
