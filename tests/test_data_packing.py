import numpy as np
import pytest

from cerbero_ray.data.packing import IGNORE_INDEX, best_fit_decreasing, build_rows, sequential_fill, split_long


def _docs(lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = []
    for n in lengths:
        ids = rng.integers(3, 32000, n).astype(np.int32)
        labels = np.where(rng.random(n) < 0.5, ids, IGNORE_INDEX).astype(np.int32)
        docs.append((ids, labels))
    return docs


def _unpack(rows, seq_len):
    """Split rows back into documents by where position_ids restart (padding has id/label pad)."""
    out = []
    for r in range(rows.input_ids.shape[0]):
        starts = list(np.flatnonzero(rows.position_ids[r] == 0)) + [seq_len]
        for a, b in zip(starts, starts[1:]):
            out.append((rows.input_ids[r, a:b], rows.labels[r, a:b]))
    return out


@pytest.mark.parametrize("seed", range(5))
def test_bfd_places_every_document_once_within_capacity(seed):
    rng = np.random.default_rng(seed)
    lengths = list(rng.integers(1, 100, 300))
    bins = best_fit_decreasing(lengths, 100)
    placed = sorted(d for b in bins for d, _, _ in b)
    assert placed == list(range(len(lengths)))
    assert all(sum(stop - start for _, start, stop in b) <= 100 for b in bins)
    assert all(start == 0 and stop == lengths[d] for b in bins for d, start, stop in b)
    # best fit decreasing is within 11/9 OPT + 1 (and OPT >= total / capacity)
    assert len(bins) <= 11 / 9 * np.ceil(sum(lengths) / 100) + 1


def test_bfd_hand_made():
    # 60 goes first, then 50 (new bin), 40 fits the 60-bin exactly, 30 fits the 50-bin, 20 fits it too
    assert best_fit_decreasing([30, 60, 40, 50, 20], 100) == [
        [(1, 0, 60), (2, 0, 40)],
        [(3, 0, 50), (0, 0, 30), (4, 0, 20)],
    ]


def test_sequential_fill_cuts_only_at_row_ends():
    bins = sequential_fill([70, 50, 100, 5], 100)
    assert bins == [[(0, 0, 70), (1, 0, 30)], [(1, 30, 50), (2, 0, 80)], [(2, 80, 100), (3, 0, 5)]]
    assert sequential_fill([], 100) == []


@pytest.mark.parametrize("mode", ["whole", "split"])
def test_rows_lose_and_duplicate_no_token(mode):
    seq = 256
    docs = _docs(np.random.default_rng(1).integers(1, seq + 1, 200))
    lengths = [len(d[0]) for d in docs]
    bins = best_fit_decreasing(lengths, seq) if mode == "whole" else sequential_fill(lengths, seq)
    rows = build_rows(docs, bins, seq, pad_id=0)
    assert rows.input_ids.shape == rows.labels.shape == rows.position_ids.shape == (len(bins), seq)
    assert rows.input_ids.dtype == np.int32
    real = sum(lengths)
    assert rows.padding == len(bins) * seq - real
    # per document: the tokens of each span, in row order, reassemble the document exactly
    for r, b in enumerate(bins):
        at = 0
        for d, start, stop in b:
            n = stop - start
            np.testing.assert_array_equal(rows.input_ids[r, at : at + n], docs[d][0][start:stop])
            np.testing.assert_array_equal(rows.position_ids[r, at : at + n], np.arange(n))
            assert rows.labels[r, at] == IGNORE_INDEX  # never trained across a document boundary
            np.testing.assert_array_equal(rows.labels[r, at + 1 : at + n], docs[d][1][start + 1 : stop])
            at += n
        assert (rows.labels[r, at:] == IGNORE_INDEX).all() and (rows.input_ids[r, at:] == 0).all()
    if mode == "whole":
        got = sorted(tuple(ids.tolist()) for ids, _ in _unpack(rows, seq) if len(ids) and ids[0] != 0)
        assert got == sorted(tuple(d[0].tolist()) for d in docs)


def test_padding_restarts_positions_and_num_docs():
    docs = _docs([3, 2])
    rows = build_rows(docs, [[(0, 0, 3), (1, 0, 2)]], 8, pad_id=0)
    assert rows.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert rows.num_docs.tolist() == [2]
    assert rows.labels[0, 0] == rows.labels[0, 3] == IGNORE_INDEX


def test_split_long_keeps_every_token():
    ids = np.arange(10, dtype=np.int32)
    parts = split_long(ids, ids.copy(), 4)
    assert [p[0].tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
