"""Decontamination: training documents that share a passage with an evaluation set.

A model trained on the test set's own text scores what it memorised, not what it learnt; Italian
web text holds SQuAD-it's Wikipedia paragraphs, and a self-chat model may have seen them too.
``data.decontaminate.paths`` names the evaluation files; every training document that shares a
run of ``data.decontaminate.ngram`` words (13, as GPT-3's contamination study; after the same
normalization as ``data.dedup``: NFKC, lower case, words) with any text in them is dropped as a
``contaminated`` reject naming the file. The check runs in the dedup pass
(:class:`cerbero_ray.data.dedup.Fingerprints`), with or without deduplication.

What counts as a text of an evaluation file: every string of a JSON file (SQuAD's contexts,
questions and answers), every string of each line of a JSON Lines file, every cell of a CSV/TSV
file (EVALITA's tweets; ids and labels are too short to count), every line of anything else. A
text of ``data.decontaminate.min_words`` (8) to ``ngram - 1`` words is matched whole: a document
holding all of it, in order, is contaminated too (most SQuAD-it questions and a third of EVALITA's
tweets are shorter than 13 words). Shorter texts are not checked: their words are ordinary Italian.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cerbero_ray import inputs, storage
from cerbero_ray.config.data import check_eval_size
from cerbero_ray.data.dedup import normalized, word_hashes, word_runs
from cerbero_ray.data.formats import Document


def eval_stamp(paths: list[str]) -> str:
    """A hash of the evaluation files' sizes and modification times ("" for none): a finished run
    checked against other contents is not up to date. ``FileNotFoundError`` / ``ValueError`` naming
    the key for a file that is not there, is a folder or is too large for one."""
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
        check_eval_size(i, path, info.size)
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


def _cells(data: str, suffix: str) -> Iterator[str] | None:
    """Every cell of a CSV/TSV text (its delimiter sniffed for .csv: EVALITA's are ``;``), or None
    when it does not read as one."""
    if suffix == ".tsv":
        dialect = csv.excel_tab
    else:
        try:
            dialect = csv.Sniffer().sniff(data[:65536], delimiters=",;\t|")
        except csv.Error:
            dialect = csv.excel
    try:
        rows = list(csv.reader(io.StringIO(data, newline=""), dialect))
    except csv.Error:  # a cell over the csv module's limit, a stray NUL: the file is read by lines
        return None
    return (cell for row in rows for cell in row)


def _texts(raw: bytes, path: str) -> Iterator[str]:
    data = inputs.to_utf8(raw).decode("utf-8", "replace")
    suffix = inputs.format_suffix(path)
    if suffix == ".json":
        try:
            yield from _strings(json.loads(data))
            return
        except (ValueError, RecursionError):
            pass  # JSON Lines under a .json name: line by line
    if suffix in (".csv", ".tsv") and (cells := _cells(data, suffix)) is not None:
        yield from cells
        return
    for line in data.splitlines():
        if suffix in (".json", ".jsonl"):
            try:
                yield from _strings(json.loads(line))
                continue
            except (ValueError, RecursionError):
                pass
        yield line


def eval_texts(path: str) -> Iterator[str]:
    """The texts of one evaluation file (local or a URI; compressed or not)."""
    return _texts(inputs.read_bytes(path), path)


@dataclass(frozen=True)
class EvalSet:
    """One evaluation file as the dedup pass checks it: ``runs`` = the sorted hashes
    (:func:`cerbero_ray.data.dedup.word_runs`) of its texts' runs of words by length, every run of
    ``ngram`` words of a text that long and each text of ``min_words`` to ``ngram - 1`` words whole;
    ``sha256`` = :func:`cerbero_ray.inputs.digest` of the same contents (the evaluate stage's identity
    of a task's file: results.md says whether a model's data was checked against that very file)."""

    path: str
    sha256: str
    runs: dict[int, np.ndarray]


def eval_sets(paths: list[str], ngram: int = 13, min_words: int = 8) -> list[EvalSet]:
    """The evaluation files, each read once."""
    out = []
    for path in paths:
        raw = inputs.read_bytes(path)
        parts: dict[int, list[np.ndarray]] = {}
        for t in _texts(raw, path):
            w = word_hashes(normalized(Document(text=t)))
            n = ngram if len(w) >= ngram else len(w)
            if n >= min_words:
                parts.setdefault(n, []).append(word_runs(w, [n]))
        runs = {n: np.unique(np.concatenate(g)) for n, g in sorted(parts.items())}
        out.append(EvalSet(path, inputs.digest(raw), runs))
    return out


def eval_grams(paths: list[str], ngram: int = 13, min_words: int = 8) -> list[dict[int, np.ndarray]]:
    """Per evaluation file, :attr:`EvalSet.runs`."""
    return [s.runs for s in eval_sets(paths, ngram, min_words)]
