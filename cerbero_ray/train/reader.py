"""Reading planned rows from the shards, with or without Ray.

:func:`read_segment` reads one run of rows of one shard, decoding only the row groups it covers.
:func:`local_batches` streams a rank's segments in one process (torchrun, benchmarks, tests);
:func:`ray_batches` streams the same segments through Ray Data (reads run as Ray tasks, prefetched
ahead of the GPU). Both yield the same micro-batches in the same order.
"""

from __future__ import annotations

import json
from typing import Iterator

import numpy as np
import pyarrow.parquet as pq

from cerbero_ray import storage
from cerbero_ray.train.plan import Segment

COLUMNS = ("input_ids", "labels", "position_ids")
SEGMENT_ROWS = 64  # rows per read (one Ray Data item): longer segments are cut, shorter ones grouped


def read_segment(path: str, start: int, stop: int) -> dict[str, np.ndarray]:
    """Rows ``[start, stop)`` of a shard as ``{column: int64 [rows, seq_len]}``."""
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:
        pf = pq.ParquetFile(f)
        groups, first, at = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if at + n > start and at < stop:
                groups.append(g)
                first = at if first is None else first
            at += n
        if stop > at:
            raise ValueError(
                f"{path} has {at} rows; the plan asks for rows up to {stop} (shards changed since the manifest?)"
            )
        table = pf.read_row_groups(groups, columns=list(COLUMNS)).slice(start - first, stop - start)
    out = {}
    for c in COLUMNS:
        col = table.column(c).combine_chunks()
        out[c] = col.flatten().to_numpy().reshape(len(col), -1).astype(np.int64)
    return out


def _items(segments: list[Segment]) -> list[list[Segment]]:
    """``segments`` in order, as reads of at most ``SEGMENT_ROWS`` rows in all: a long segment is cut,
    short ones (rows mixed across shards) are grouped."""
    items: list[list[Segment]] = [[]]
    have = 0
    for s in segments:
        for a in range(s.start, s.stop, SEGMENT_ROWS):
            piece = Segment(s.path, a, min(a + SEGMENT_ROWS, s.stop))
            if have + piece.rows > SEGMENT_ROWS:
                items.append([])
                have = 0
            items[-1].append(piece)
            have += piece.rows
    return [i for i in items if i]


def _read(item: list[Segment]) -> dict[str, np.ndarray]:
    parts = [read_segment(s.path, s.start, s.stop) for s in item]
    return {k: np.concatenate([x[k] for x in parts]) for k in COLUMNS}


def _rebatch(chunks: Iterator[dict[str, np.ndarray]], micro: int) -> Iterator[dict[str, np.ndarray]]:
    buf: list[dict[str, np.ndarray]] = []
    have = 0
    for c in chunks:
        buf.append(c)
        have += len(c["input_ids"])
        while have >= micro:
            cat = {k: np.concatenate([b[k] for b in buf]) for k in COLUMNS}
            yield {k: v[:micro] for k, v in cat.items()}
            rest = {k: v[micro:] for k, v in cat.items()}
            buf, have = ([rest], len(rest["input_ids"])) if len(rest["input_ids"]) else ([], 0)
    if have:
        raise ValueError(f"{have} rows left over: a rank's range must be whole micro-batches")


def local_batches(segments: list[Segment], micro: int) -> Iterator[dict[str, np.ndarray]]:
    """Micro-batches of ``micro`` rows, read in this process."""
    return _rebatch((_read(item) for item in _items(segments)), micro)


def _read_items(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    parts = [_read([Segment(*s) for s in json.loads(str(x))]) for x in batch["segments"]]
    return {k: np.concatenate([x[k] for x in parts]) for k in COLUMNS}


def ray_batches(
    segments: list[Segment], micro: int, read_cpus: float = 0.25, prefetch: int = 4
) -> Iterator[dict[str, np.ndarray]]:
    """The same micro-batches as :func:`local_batches`, read by Ray Data tasks in order."""
    import ray.data

    items = _items(segments)
    if not items:
        return iter(())
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    ds = ray.data.from_items(
        [{"segments": json.dumps([[s.path, s.start, s.stop] for s in item])} for item in items],
        override_num_blocks=len(items),
    )
    ds = ds.map_batches(_read_items, batch_size=1, batch_format="numpy", num_cpus=read_cpus)
    return ds.iter_batches(batch_size=micro, batch_format="numpy", prefetch_batches=prefetch, drop_last=False)
