"""The planned data order: every row once per epoch, disjoint ranks, exact resume points."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cerbero_ray.config.train import TrainConfig
from cerbero_ray.train.plan import plan_epoch, remaining, signature, step_rows, take
from cerbero_ray.train.reader import local_batches, read_segment

SHARDS = [{"path": f"s{i}", "rows": n} for i, n in enumerate([13, 0, 7, 21, 5])]  # 46 rows


def rows_of(segments):
    return [(s.path, r) for s in segments for r in range(s.start, s.stop)]


@pytest.mark.parametrize("block", [0, 1, 4])
@pytest.mark.parametrize("world,micro,accum,eval_rows", [(1, 1, 1, 0), (2, 1, 4, 6), (3, 2, 2, 1), (4, 1, 1, 10)])
def test_every_row_once_and_ranks_disjoint(world, micro, accum, eval_rows, block):
    p = plan_epoch(
        SHARDS, 0, world_size=world, micro_batch=micro, accum=accum, seed=3, eval_rows=eval_rows, mix_block_rows=block
    )
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


@pytest.mark.parametrize("block", [0, 1, 3])
def test_remaining_starts_exactly_at_the_step(block):
    p = plan_epoch(SHARDS, 0, world_size=2, micro_batch=2, accum=3, seed=0, mix_block_rows=block)
    for rank in range(2):
        full = rows_of(p.ranges[rank])
        for step in range(p.steps + 1):
            assert rows_of(remaining(p, rank, step, 2, 3)) == full[step * 6 :]


def test_global_batches_mix_the_shards():
    shards = [{"path": f"s{i}", "rows": 40} for i in range(10)]  # one shard, one source: the worst case
    kw = dict(world_size=2, micro_batch=2, accum=4, seed=5)

    def shards_per_batch(block):
        p = plan_epoch(shards, 0, **kw, mix_block_rows=block)
        batches = [step_rows(p, s, 2, 4) for s in range(p.steps)]
        assert all(sum(x.rows for x in b) == 16 for b in batches) and p.steps == 25
        return np.mean([len({x.path for x in b}) for b in batches])

    in_order, blocks, rows = shards_per_batch(0), shards_per_batch(4), shards_per_batch(1)
    assert in_order <= 2.5 and blocks >= 3 and rows >= 7  # 16 rows from 10 shards: 8.1 expected
    e0, e1 = (plan_epoch(shards, e, **kw, mix_block_rows=1) for e in (0, 1))
    assert step_rows(e0, 0, 2, 4) != step_rows(e1, 0, 2, 4)  # a new mix every epoch


def test_the_signature_tracks_the_mix():
    t = {"micro_batch_size": 1, "global_batch_size": 4, "epochs": 1, "seed": 0, "eval_rows": 0, "max_steps": None}
    t = {"data_dir": "-", "output_dir": "-", **t}
    sigs = {b: signature(SHARDS, TrainConfig(**t, mix_block_rows=b), 2) for b in (0, 1, 4)}
    assert len(set(sigs.values())) == 3  # a checkpoint resumes only the order it was made with
    assert sigs[1] == signature(SHARDS, TrainConfig(**t), 2)  # 1 is the default
    assert sigs[0] != signature(SHARDS, TrainConfig(**{**t, "seed": 1}, mix_block_rows=0), 2)


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
