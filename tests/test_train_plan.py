"""The planned data order: every row once per epoch, disjoint ranks, exact resume points."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cerbero_ray.train.plan import plan_epoch, remaining, take
from cerbero_ray.train.reader import local_batches, read_segment

SHARDS = [{"path": f"s{i}", "rows": n} for i, n in enumerate([13, 0, 7, 21, 5])]  # 46 rows


def rows_of(segments):
    return [(s.path, r) for s in segments for r in range(s.start, s.stop)]


@pytest.mark.parametrize("world,micro,accum,eval_rows", [(1, 1, 1, 0), (2, 1, 4, 6), (3, 2, 2, 1), (4, 1, 1, 10)])
def test_every_row_once_and_ranks_disjoint(world, micro, accum, eval_rows):
    p = plan_epoch(SHARDS, 0, world_size=world, micro_batch=micro, accum=accum, seed=3, eval_rows=eval_rows)
    per_step = world * micro * accum
    assert p.steps == (46 - eval_rows) // per_step and p.rows_per_rank == p.steps * micro * accum
    train = [rows_of(r) for r in p.ranges]
    held = [x for r in p.eval_ranges for x in rows_of(r)]
    assert all(len(t) == p.rows_per_rank for t in train)
    flat = [x for t in train for x in t]
    assert len(set(flat)) == len(flat) and not set(flat) & set(held)
    assert len(held) == eval_rows == len(set(held))
    assert len(flat) + len(held) + p.dropped_rows == 46


def test_seeded_and_epochs_differ_but_hold_out_the_same_rows():
    kw = dict(world_size=2, micro_batch=1, accum=2, seed=7, eval_rows=5)
    a, b = plan_epoch(SHARDS, 0, **kw), plan_epoch(SHARDS, 0, **kw)
    assert a == b
    e1 = plan_epoch(SHARDS, 1, **kw)
    assert e1.ranges != a.ranges and e1.eval_ranges == a.eval_ranges
    assert plan_epoch(SHARDS, 0, **{**kw, "seed": 8}).ranges != a.ranges


def test_remaining_starts_exactly_at_the_step():
    p = plan_epoch(SHARDS, 0, world_size=2, micro_batch=2, accum=3, seed=0)
    for rank in range(2):
        full = rows_of(p.ranges[rank])
        for step in range(p.steps + 1):
            assert rows_of(remaining(p, rank, step, 2, 3)) == full[step * 6 :]


def test_take_spans_segments():
    p = plan_epoch(SHARDS, 0, world_size=1, micro_batch=1, accum=1, seed=0)
    full = rows_of(p.ranges[0])
    assert rows_of(take(p.ranges[0], 10, 30)) == full[10:30]


def test_too_many_held_out_rows():
    with pytest.raises(ValueError, match="eval_rows"):
        plan_epoch(SHARDS, 0, world_size=1, micro_batch=1, accum=1, seed=0, eval_rows=46)


def write_shard(path, rows, seq, first, group):
    ids = np.arange(first * seq, (first + rows) * seq, dtype=np.int32).reshape(rows, seq)
    col = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), seq)
    pq.write_table(
        pa.table({"input_ids": col(ids), "labels": col(-ids), "position_ids": col(ids % seq)}),
        path,
        row_group_size=group,
    )
    return {"path": str(path), "rows": rows}


def test_reader_returns_the_planned_rows_in_order(tmp_path):
    seq = 8
    shards = [write_shard(tmp_path / "a.parquet", 11, seq, 0, 4), write_shard(tmp_path / "b.parquet", 9, seq, 100, 3)]
    assert read_segment(shards[0]["path"], 3, 9)["input_ids"][:, 0].tolist() == [r * seq for r in range(3, 9)]
    p = plan_epoch(shards, 0, world_size=2, micro_batch=2, accum=2, seed=1)
    for rank in range(2):
        want = [(s, r) for s, r in rows_of(p.ranges[rank])]
        got = [b["input_ids"][:, 0] // seq for b in local_batches(p.ranges[rank], 2)]
        first = {shards[0]["path"]: 0, shards[1]["path"]: 100}
        assert np.concatenate(got).tolist() == [first[s] + r for s, r in want]
    with pytest.raises(ValueError, match="has 11 rows"):
        read_segment(shards[0]["path"], 5, 12)
