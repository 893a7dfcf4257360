"""Packing whole documents into rows of exactly ``seq_len`` tokens. Pure numpy, no Ray.

Each document is a pair (``ids``, ``labels``) of int32 arrays of equal length, ``labels`` being
-100 where no loss is taken. :func:`best_fit_decreasing` assigns documents to bins of capacity
``seq_len`` (longest first, each into the fullest bin that still has room), documents whole;
:func:`sequential_fill` fills every row to the brim instead, cutting the document that crosses a
row end into two pieces (each trained as its own document). Both return, per row, spans
``(doc, start, stop)``; :func:`build_rows` lays the spans out as rows. In a row, ``position_ids``
restart at 0 for each document, so the trainer can keep documents from attending to each other,
and the first label of every document is -100, so no document is trained to follow the one
before it. Padding (``pad_id``, label -100) fills the end of a row and counts as one more position run.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from cerbero_ray.shards import IGNORE_INDEX  # noqa: F401 (re-exported: the packers' label)


@dataclass
class PackedRows:
    input_ids: np.ndarray  # [rows, seq_len] int32
    labels: np.ndarray  # [rows, seq_len] int32
    position_ids: np.ndarray  # [rows, seq_len] int32
    num_docs: np.ndarray  # [rows] int32
    padding: int


def split_long(ids: np.ndarray, labels: np.ndarray, seq_len: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """A document longer than ``seq_len`` as consecutive pieces of at most ``seq_len`` tokens."""
    return [(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids), seq_len)]


Span = tuple[int, int, int]  # (document index, start, stop)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[Span]]:
    """Whole documents per bin. Every length must be in [1, capacity]."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[Span]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        n = lengths[i]
        assert 0 < n <= capacity, f"document {i} has {n} tokens, capacity {capacity}"
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append((i, 0, n))
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


def sequential_fill(lengths: list[int], capacity: int) -> list[list[Span]]:
    """Documents in order, each row filled to ``capacity``; a document crossing a row end is cut
    there. Every row but the last is full."""
    bins: list[list[Span]] = [[]]
    room = capacity
    for i, n in enumerate(lengths):
        start = 0
        while start < n:
            if room == 0:
                bins.append([])
                room = capacity
            take = min(room, n - start)
            bins[-1].append((i, start, start + take))
            start += take
            room -= take
    return bins if bins[0] else []


def build_rows(
    docs: list[tuple[np.ndarray, np.ndarray]], bins: list[list[Span]], seq_len: int, pad_id: int
) -> PackedRows:
    """Rows laid out from ``bins`` of spans; each span restarts ``position_ids`` and has its first
    label ignored."""
    rows = len(bins)
    input_ids = np.full((rows, seq_len), pad_id, dtype=np.int32)
    labels = np.full((rows, seq_len), IGNORE_INDEX, dtype=np.int32)
    position_ids = np.empty((rows, seq_len), dtype=np.int32)
    arange = np.arange(seq_len, dtype=np.int32)
    padding = 0
    for r, members in enumerate(bins):
        at = 0
        for d, start, stop in members:
            ids, lab = docs[d]
            n = stop - start
            input_ids[r, at : at + n] = ids[start:stop]
            labels[r, at : at + n] = lab[start:stop]
            labels[r, at] = IGNORE_INDEX
            position_ids[r, at : at + n] = arange[:n]
            at += n
        position_ids[r, at:] = arange[: seq_len - at]
        padding += seq_len - at
    num_docs = np.array([len(b) for b in bins], dtype=np.int32)
    return PackedRows(input_ids, labels, position_ids, num_docs, padding)
