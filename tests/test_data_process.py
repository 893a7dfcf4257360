"""The packing buffer end to end without Ray: parse, tokenize, mask, pack, write, reject."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from cerbero_ray.data.packing import IGNORE_INDEX
from cerbero_ray.data.process import copies
from conftest import buffer_processor

CHAT = {
    "messages": [
        {"role": "user", "content": "Qual è la capitale d'Italia?"},
        {"role": "assistant", "content": "La capitale d'Italia è Roma."},
    ]
}


def batch(rows, source="s", kind="jsonl"):
    raws = [r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in rows]
    n = len(raws)
    return {
        "source": np.array([source] * n, dtype=object),
        "path": np.array(["in.jsonl"] * n, dtype=object),
        "line_no": np.arange(1, n + 1),
        "kind": np.array([kind] * n, dtype=object),
        "raw": np.array(raws + [b""], dtype=object)[:n],
    }


def run(tmp_path, rows, fmt="openai", **data):
    proc = buffer_processor(tmp_path, {"s": {"format": fmt, "weight": data.pop("weight", 1.0)}}, **data)
    stats = {k: v[0] for k, v in proc(batch(rows)).items()}
    table = pq.read_table(stats["shard"]) if stats["shard"] else None
    return stats, table


def rows_of(table, col):
    return np.array(table.column(col).to_pylist(), dtype=np.int64)


def test_chat_masks_train_only_the_answer(tmp_path, tok):
    stats, table = run(tmp_path, [CHAT])
    ids, labels, pos = rows_of(table, "input_ids"), rows_of(table, "labels"), rows_of(table, "position_ids")
    assert ids.shape == (1, 512) and stats["rows"] == 1
    expected = tok.apply_chat_template(CHAT["messages"], tokenize=False)
    n = stats["tokens"]
    assert ids[0, :n].tolist() == tok(expected, add_special_tokens=False).input_ids
    trained = labels[0][labels[0] != IGNORE_INDEX]
    assert tok.decode(trained).strip() == "La capitale d'Italia è Roma.\n</s>".strip()
    assert stats["loss_tokens"] == len(trained)
    assert pos[0, :n].tolist() == list(range(n)) and pos[0, n] == 0
    assert (labels[0, n:] == IGNORE_INDEX).all() and stats["padding"] == 512 - n


def test_special_token_strings_in_content_are_text(tmp_path, tok):
    html = "<s>prezzo vecchio</s> prezzo nuovo"
    chat = {
        "messages": [{"role": "user", "content": f"Cosa vuol dire {html}?"}, {"role": "assistant", "content": html}]
    }
    for rows, fmt in (([chat], "openai"), ([{"text": f"Nel sito: {html}."}], "text")):
        stats, table = run(tmp_path / fmt, rows, fmt=fmt)
        ids, labels = rows_of(table, "input_ids"), rows_of(table, "labels")
        assert stats["documents"] == 1 and (ids == tok.bos_token_id).sum() == 1 and (ids == tok.eos_token_id).sum() == 1
        assert html in tok.decode(labels[labels != IGNORE_INDEX])  # "<s>…</s>" trained as the text it is


def test_rows_record_each_document_s_source_and_length(tmp_path):
    stats, table = run(tmp_path, [CHAT] * 5, seq_len=128)
    t = table.to_pydict()
    assert max(t["num_docs"]) > 1
    pos = np.array(t["position_ids"])
    for sources, lengths, n, p in zip(t["doc_sources"], t["doc_tokens"], t["num_docs"], pos):
        assert sources == ["s"] * n and len(lengths) == n
        starts = np.flatnonzero(p == 0)[:n]  # each document restarts the positions
        assert lengths == np.diff(np.append(starts, starts[0] + sum(lengths))).tolist()
    assert sum(map(sum, t["doc_tokens"])) == stats["tokens"]


def test_loss_on_all_trains_everything_but_document_starts(tmp_path):
    stats, table = run(tmp_path, [CHAT, CHAT], loss_on="all")
    labels, ids = rows_of(table, "labels")[0], rows_of(table, "input_ids")[0]
    assert stats["loss_tokens"] == stats["tokens"] - 2  # both BOS positions are ignored
    n = stats["tokens"] // 2
    assert labels[0] == labels[n] == IGNORE_INDEX and (labels[1:n] == ids[1:n]).all()


def test_bad_rows_are_rejected_counted_and_kept(tmp_path):
    rows = [
        CHAT,
        b"\xff\xfe not utf-8",
        b"{not json",
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
        {"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "b"}]},
        {"text": "x"},
    ]
    stats, _ = run(tmp_path, rows)
    assert stats["documents"] == 1 and stats["rejected"] == 6
    assert json.loads(stats["reject_reasons"]) == {
        "invalid_utf8": 1,
        "invalid_json": 1,
        "unknown_role": 1,
        "non_alternating": 1,
        "empty_text": 1,
        "missing_field": 1,
    }
    rejects = [json.loads(line) for line in open(stats["rejects_path"])]
    assert [r["line_no"] for r in rejects] == [2, 3, 4, 5, 6, 7]
    assert rejects[0]["raw"].endswith("not utf-8") and rejects[1]["raw"] == "{not json"


def test_long_documents_split_or_dropped(tmp_path):
    long = {"text": "parola " * 1500}  # ~1,500+ tokens > 512
    stats, table = run(tmp_path / "split", [long, {"text": "breve"}], fmt="text")
    assert stats["split_documents"] == 1 and stats["split_pieces"] >= 3 and stats["documents"] == 2
    assert stats["rows"] >= 3 and table.num_rows == stats["rows"]
    stats, _ = run(tmp_path / "drop", [long, {"text": "breve"}], fmt="text", long_docs="drop")
    assert stats["dropped_long"] == 1 and stats["documents"] == 1
    assert json.loads(stats["reject_reasons"]) == {"too_long": 1}
    assert json.loads(open(stats["rejects_path"]).readline())["reason"] == "too_long"


def test_weights_repeat_and_subsample_deterministically(tmp_path):
    docs = [{"text": f"documento numero {i}"} for i in range(400)]
    assert run(tmp_path / "a", docs, fmt="text", weight=2.0)[0]["documents"] == 800
    half = run(tmp_path / "b", docs, fmt="text", weight=0.5)[0]["documents"]
    assert 160 < half < 240
    assert half == run(tmp_path / "c", docs, fmt="text", weight=0.5)[0]["documents"]
    assert copies(1.5, 0, "k") in (1, 2) and copies(0.0, 0, "k") == 0


@pytest.mark.parametrize("packing", ["whole", "split"])
def test_same_input_same_shard(tmp_path, packing, tok):
    docs = [{"text": "testo " * int(n)} for n in np.random.default_rng(0).integers(5, 300, 60)]
    a, ta = run(tmp_path / "a", docs, fmt="text", packing=packing)
    b, tb = run(tmp_path / "b", docs, fmt="text", packing=packing)
    assert ta.equals(tb) and a["tokens"] == sum(len(tok(d["text"]).input_ids) + 1 for d in docs)
    if packing == "split":
        assert a["padding"] < 512 and a["cut_to_fill"] >= 1


def test_the_packing_actor_never_loads_torch(tmp_path):
    """The data stage's actors (the dedup pass's fingerprints, the packing buffer, chat and text)
    run without torch: ~175 MB and a second less for each actor a CPU cluster starts."""
    import subprocess
    import sys

    code = f"""
import sys, json
sys.path.insert(0, {repr(str(__import__("pathlib").Path(__file__).parent))})
from test_data_process import CHAT, batch
from conftest import buffer_processor
from cerbero_ray.data.dedup import Fingerprints
from cerbero_ray.config.data import SourceConfig
chat, text = batch([CHAT], source="c"), batch([{{"text": "Il mare d'inverno è calmo e grigio."}}], source="t")
sources = {{"c": {{"format": "openai"}}, "t": {{"format": "text"}}}}
typed = {{k: SourceConfig(path="-", **s) for k, s in sources.items()}}
proc, rows = buffer_processor({repr(str(tmp_path))}, sources), 0
for b in (chat, text):
    Fingerprints(typed, "near")(b)
    rows += int(proc(b)["documents"][0])
print(json.dumps([rows, "torch" in sys.modules]))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    rows, torch_loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert rows == 2 and torch_loaded is False
