"""Deduplication: what counts as the same document, which copy is kept, and the data stage's pass
(counted rejects naming the kept row, reruns and resumes that agree, a bucket as well as a disk)."""

import json
import logging
import os
import random

import numpy as np
import pyarrow as pa
import pytest

from cerbero_ray.config.data import SourceConfig
from cerbero_ray.data.dedup import (
    BANDS,
    DropList,
    FileIds,
    Fingerprints,
    _mix,
    band_hashes,
    find_duplicates,
    grams,
    normalized,
    word_hashes,
    word_runs,
    write_duplicates,
)
from cerbero_ray.data.formats import Document
from conftest import SHARED_DATA, buffer_processor, data_stage, write_jsonl

WORDS = [f"parola{i}" for i in range(3000)]


def prose(rng: random.Random, n: int = 200) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def edited(rng: random.Random, text: str, words: int) -> str:
    w = text.split()
    for i in rng.sample(range(len(w)), words):
        w[i] = rng.choice(WORDS)
    return " ".join(w)


def batch(texts, path="in.jsonl", source="s", first_line=1):
    raws = [json.dumps({"text": t}, ensure_ascii=False).encode() if isinstance(t, str) else t for t in texts]
    n = len(raws)
    return {
        "source": np.array([source] * n, dtype=object),
        "path": np.array([path] * n, dtype=object),
        "line_no": np.arange(first_line, first_line + n),
        "kind": np.array(["jsonl"] * n, dtype=object),
        "raw": np.array(raws + [b""], dtype=object)[:n],
    }


SOURCES = {"s": SourceConfig(path="-", format="text"), "t": SourceConfig(path="-", format="text")}


def fingerprints(batches, files, mode="near"):
    parts = [files.compact(Fingerprints(SOURCES, mode)(b)) for b in batches]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def duplicates(batches, planned, mode="near"):
    files = FileIds(planned)
    return find_duplicates(fingerprints(batches, files, mode), files)


def test_exact_means_the_same_text_up_to_case_spacing_and_unicode_form():
    same = [" Ciao,\tMONDO!\n", "ciao, mondo!", "ciao, mondo!"]  # the last with a compatibility (NFKC) form
    assert len({normalized(Document(text=t)) for t in same}) == 1
    assert normalized(Document(text="ciao, mondo")) != normalized(Document(text="ciao mondo"))
    user = Document(messages=[{"role": "user", "content": "Ciao"}, {"role": "assistant", "content": "Salve"}])
    swapped = Document(messages=[{"role": "assistant", "content": "Ciao"}, {"role": "user", "content": "Salve"}])
    assert normalized(user) != normalized(swapped)  # who says it is part of a chat


def test_minhash_finds_near_copies_and_only_them():
    rng = random.Random(0)
    base = prose(rng)
    assert band_hashes("!!! ...") is None  # no word: only the exact hash can match it
    near = sum((band_hashes(base) == band_hashes(edited(rng, base, 2))).any() for _ in range(40))
    far = sum((band_hashes(base) == band_hashes(edited(rng, base, 40))).any() for _ in range(40))
    other = sum((band_hashes(base) == band_hashes(prose(rng))).any() for _ in range(40))
    # 2 of 200 words changed: Jaccard ~0.9 (found ~always); 40: ~0.35 (never); unrelated: never
    assert near >= 38 and far == 0 and other == 0, (near, far, other)
    assert band_hashes(base).shape == (BANDS,) and band_hashes(base).dtype == np.uint64
    long = prose(rng, 20_000)  # longer than one MinHash chunk: the same keys as computed in one go
    assert (band_hashes(long) == band_hashes(long + " ")).all()


def test_a_whole_book_is_read_in_segments_with_the_same_result(monkeypatch):
    import cerbero_ray.data.dedup as dedup

    rng = random.Random(4)
    book = "\n".join(prose(rng, 50) for _ in range(400))  # 20,000 words, lines of 50
    whole = band_hashes(book)
    monkeypatch.setattr(dedup, "_SEGMENT", 997)  # ~70 segments, each cut at a space or a newline
    assert (band_hashes(book) == whole).all()
    assert (dedup.word_hashes(book) == dedup.word_hashes(book.replace("\n", " "))).all()


def test_the_first_copy_in_config_order_is_kept_however_the_rows_arrive():
    rng = random.Random(1)
    a, c = prose(rng), prose(rng)
    b = edited(rng, a, 1)  # a near copy of a
    b2 = edited(rng, b, 1)  # of b: a chain, one cluster
    rows_t = batch([b, a.upper(), c], path="t.jsonl", source="t")  # source t comes second in the config
    rows_s = batch(["ciao", b2, "!!!", "!!!", b"{broken"], path="s.jsonl", source="s")
    planned = [("s", "s.jsonl"), ("t", "t.jsonl")]
    one = duplicates([rows_t, rows_s], planned).to_pylist()
    split = [{k: v[i : i + 1] for k, v in rows_s.items()} for i in range(5)]
    again = duplicates([*split[::-1], rows_t], planned).to_pylist()
    key = lambda r: (r["source"], r["line_no"])  # noqa: E731
    assert sorted(one, key=key) == sorted(again, key=key)  # batching and arrival order change nothing
    got = {(r["source"], r["line_no"]): (r["reason"], r["of_source"], r["of_line_no"]) for r in one}
    assert got == {
        ("s", 4): ("duplicate", "s", 3),  # "!!!" twice: no word, found by its exact hash
        ("t", 1): ("near_duplicate", "s", 2),  # b: near b2, which comes first (source s)
        ("t", 2): ("near_duplicate", "s", 2),  # a: near b, so near b2's cluster
    }
    exact_only = duplicates([rows_t, rows_s], planned, "exact").to_pylist()
    assert [(r["source"], r["line_no"]) for r in exact_only] == [("s", 4)]
    assert duplicates([batch(["x"])], [("s", "in.jsonl")]).num_rows == 0
    # a file the plan did not name (never expected): ranked after the planned ones, not an error
    late = duplicates([batch([b2], path="z.jsonl"), rows_s], [("s", "s.jsonl")]).to_pylist()
    assert [(r["reason"], r["of_path"], r["of_line_no"]) for r in late if r["path"] == "z.jsonl"] == [
        ("duplicate", "s.jsonl", 2)
    ]


def write_and_read(table, **meta):
    import tempfile

    from cerbero_ray.data.dedup import read_duplicates

    with tempfile.TemporaryDirectory() as d:
        return read_duplicates(write_duplicates(table, os.path.join(d, "t.parquet"), **meta))


def test_the_packing_buffer_rejects_what_the_table_names(tmp_path):
    rng = random.Random(2)
    big = prose(rng, 800)  # over 1 KiB: a duplicate's reject keeps its first KiB and its length
    rows = batch([big, "altro testo", big, big.upper()])
    table = duplicates([rows], [("s", "in.jsonl")], "exact")
    path = write_duplicates(table, str(tmp_path / "dups.parquet"), documents=4)
    proc = buffer_processor(tmp_path / "out", {"s": {"format": "text"}})
    clean = {k: v[0] for k, v in proc(rows).items()}
    assert clean["documents"] == 4 and clean["rejected"] == 0
    proc = buffer_processor(tmp_path / "out2", {"s": {"format": "text"}}, duplicates=path)
    stats = {k: v[0] for k, v in proc(rows).items()}
    assert stats["documents"] == 2 and json.loads(stats["reject_reasons"]) == {"duplicate": 2}
    rejects = [json.loads(x) for x in open(stats["rejects_path"])]
    assert [r["line_no"] for r in rejects] == [3, 4]
    assert all(r["detail"] == "same text as s in.jsonl:1 (kept)" for r in rejects)
    raw = json.dumps({"text": big}).encode()
    assert rejects[0]["raw_bytes"] == len(raw) and rejects[0]["raw"] == raw[:1024].decode()
    assert DropList(table).for_batch(["other.jsonl"]) == {}
    plain = table.set_column(1, "path", table["path"].cast(pa.string()))  # not dictionary-encoded: the same
    assert DropList(plain).for_batch(["in.jsonl", "x"]) == DropList(table).for_batch(["in.jsonl"])
    assert len(DropList(table).for_batch(["in.jsonl"])) == 2


@pytest.mark.integration
def test_the_stage_drops_near_copies_across_sources_and_resumes(ray_local, tmp_path, monkeypatch, caplog):
    import cerbero_ray.data.pipeline as pipeline
    from cerbero_ray.data.manifest import write_manifest
    from cerbero_ray.data.pipeline import run_data

    rng = random.Random(3)
    docs = [prose(rng, 120) for _ in range(30)]
    first = write_jsonl(tmp_path / "web.jsonl", [{"text": t} for t in docs[:20]])
    # the second source: 10 new, 5 near copies of the first source's, 5 exact (case, spacing)
    again = [edited(rng, t, 1) for t in docs[:5]] + ["  " + t.upper() for t in docs[5:10]] + docs[20:]
    second = write_jsonl(tmp_path / "forum.jsonl", [{"text": t} for t in again])
    sources = {"web": {"path": first, "format": "text"}, "forum": {"path": second, "format": "text"}}
    monkeypatch.setattr(pipeline, "LOCAL_PASS_BYTES", 0)  # the pass as a Ray Data job, as on inputs over 32 MB
    near = run_data(data_stage(tmp_path / "near", sources, seq_len=512, buffer_docs=8, dedup="near"))
    assert near["documents_by_source"] == {"web": 20, "forum": 10}
    assert near["rejects_by_reason"] == {"duplicate": 5, "near_duplicate": 5}
    assert near["dedup"]["documents"] == 40 and near["dedup"]["near_duplicates"] == 5
    rejects = [json.loads(x) for f in near["rejects_files"] for x in open(f)]
    assert {r["source"] for r in rejects} == {"forum"} and all(first in r["detail"] for r in rejects)
    # in the driver (the inputs' size decides, not the outcome): the same table
    monkeypatch.setattr(pipeline, "LOCAL_PASS_BYTES", 1 << 30)
    # stopped before its manifest, then run again: the pass's table is reused, the result the same
    out = tmp_path / "resumed"
    cfg = data_stage(out, sources, seq_len=512, buffer_docs=8, dedup="near")
    monkeypatch.setattr(pipeline, "write_manifest", lambda *_: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        run_data(cfg)
    monkeypatch.setattr(pipeline, "write_manifest", write_manifest)
    assert (out / "duplicates.parquet").exists()
    caplog.set_level(logging.INFO, logger="cerbero_ray")
    b = run_data(data_stage(out, sources, seq_len=512, buffer_docs=8, dedup="near"))
    assert "duplicates.parquet reused" in caplog.text
    assert (b["documents"], b["rows"], b["tokens"], b["rejects_by_reason"]) == (
        near["documents"],
        near["rows"],
        near["tokens"],
        near["rejects_by_reason"],
    )
    assert sorted(os.listdir(out)) == ["manifest.json", "rejects", "shards"]


SQUAD = os.path.join(SHARED_DATA, "squad_it", "SQuAD_it-test.sample_1k.json")


def test_a_document_quoting_an_evaluation_passage_is_marked(tmp_path):
    from cerbero_ray.data.decontaminate import eval_grams, eval_texts

    context = json.load(open(SQUAD))["data"][0]["paragraphs"][0]["context"]
    words = context.split()
    quoted = " ".join(words[10:23])  # 13 words of SQuAD-it's first context
    rng = random.Random(5)
    question = "Chi scrisse la Divina Commedia nel Trecento?"
    (tmp_path / "items.jsonl").write_text(json.dumps({"id": 1, "item": {"question": question}}))
    assert question in list(eval_texts(str(tmp_path / "items.jsonl")))
    (tmp_path / "deep.jsonl").write_text("[" * 100_000 + "\n" + json.dumps({"q": question}) + "\n")
    assert list(eval_texts(str(tmp_path / "deep.jsonl"))) == ["[" * 100_000, question]  # too deep: a line of text
    # a CSV's cells, its delimiter sniffed (EVALITA's is ";"), a quoted cell holding it: the tweet is one text
    tweet = "oggi il mare di Napoli era; davvero bellissimo al tramonto"  # 10 words
    (tmp_path / "items.csv").write_text(f'id;text;label\n7;{prose(rng, 30)};1\n8;"{tweet}";0\n')
    assert tweet in list(eval_texts(str(tmp_path / "items.csv")))
    evals = eval_grams([str(tmp_path / "items.csv"), SQUAD], 13, 8)
    # the 30-word cell's 18 runs of 13; the tweet whole (10 words); ids, labels and the header: too short
    assert {n: len(g) for n, g in evals[0].items()} == {13: 30 - 13 + 1, 10: 1}
    assert len(evals[1][13]) > 10_000 and min(evals[1]) == 8  # SQuAD-it's contexts, and its short questions whole
    docs = [
        f"Una domanda. {quoted.upper()}, disse lui.",  # the passage, in upper case: found (SQuAD-it's set)
        # 12 of its words: no 13-word run, but a whole answer of SQuAD-it (9 words: "membri dell'
        # Organizzazione dei Paesi esportatori di petrolio arabo"): found
        "Una domanda. " + " ".join(words[10:22]) + " e poi altro.",
        prose(rng),
        f"Ho letto: {tweet.upper()}! E basta.",  # the whole tweet inside a document: found (the CSV)
        "Oggi il mare di Napoli era davvero bellissimo, e domani?",  # 8 of its 10 words: not
    ]
    fp = Fingerprints(SOURCES, "none", evals)(batch(docs))
    assert fp["contaminated"].tolist() == [1, 1, -1, 0, -1] and "bands" not in fp
    # min_words = ngram: no text is matched whole (the tweet's and the answer's documents pass); runs
    # of 12 words find the 12 words
    assert Fingerprints(SOURCES, "none", eval_grams([SQUAD], 13, 13))(batch(docs[1:2]))["contaminated"].tolist() == [-1]
    assert Fingerprints(SOURCES, "none", eval_grams([str(tmp_path / "items.csv")], 13, 13))(batch(docs[3:4]))[
        "contaminated"
    ].tolist() == [-1]
    assert Fingerprints(SOURCES, "none", eval_grams([SQUAD], 12, 12))(batch(docs[1:2]))["contaminated"].tolist() == [0]


def test_word_runs_are_the_grams_of_each_length_before_mixing():
    w = word_hashes(prose(random.Random(9), 40))
    for n in (1, 5, 13, 40, 41, 60):
        assert (_mix(word_runs(w, [n])) == grams(w, n)).all() and len(word_runs(w, [n])) == max(0, 40 - n + 1)
    both = word_runs(w, [13, 5])
    assert (both == np.concatenate([word_runs(w, [5]), word_runs(w, [13])])).all()


def test_a_contaminated_row_is_dropped_and_its_clean_near_copy_kept():
    rng = random.Random(6)
    passage, words = prose(rng, 13).split(), prose(rng, 200).split()
    a = " ".join(words[:100] + passage + words[100:])
    b = " ".join(words[:100] + passage[:6] + ["cambiata"] + passage[7:] + words[100:])  # no 13-word run of it
    passage = " ".join(passage)
    files = FileIds([("s", "in.jsonl")])
    evals = [{13: np.unique(word_runs(word_hashes(passage), [13]))}]
    parts = [files.compact(Fingerprints(SOURCES, "near", evals)(batch([a, b])))]
    fp = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    table = find_duplicates(fp, files, ["eval/set.jsonl"])
    got = [(r["line_no"], r["reason"], r["of_path"], r["of_line_no"]) for r in table.to_pylist()]
    assert got == [(1, "contaminated", "eval/set.jsonl", -1)]  # b is a near copy of a, but a is not kept: b is
    without = find_duplicates({k: v for k, v in fp.items() if k != "contaminated"}, files).to_pylist()
    assert [(r["line_no"], r["reason"], r["of_line_no"]) for r in without] == [(2, "near_duplicate", 1)]
    drops = DropList(write_and_read(table, ngram=13, min_words=8)).for_batch(["in.jsonl"])
    assert drops[("s", "in.jsonl", 1)] == (
        "contaminated",
        "shares a passage of 13 words (or one of its texts of 8 to 12 words whole) with the evaluation set "
        "eval/set.jsonl",
    )
    # a table from before min_words (or min_words = ngram): passages only
    drops = DropList(write_and_read(table, ngram=13)).for_batch(["in.jsonl"])
    assert drops[("s", "in.jsonl", 1)][1] == "shares a passage of 13 words with the evaluation set eval/set.jsonl"


@pytest.mark.parametrize(
    "over,says",
    [
        ({"paths": ["/no/such/eval.json"]}, r"data.decontaminate.paths\[0\]: no such file"),
        ({"paths": [SQUAD], "ngram": 3}, r"data.decontaminate.ngram must be an integer >= 5"),
        (
            {"paths": [SQUAD], "min_words": 4},
            r"data.decontaminate.min_words must be an integer from 5 to .* \(13\), got 4",
        ),
        ({"paths": [SQUAD], "ngram": 10, "min_words": 11}, r"data.decontaminate.min_words must be .* got 11"),
        ({"paths": [os.path.dirname(SQUAD)]}, r"data.decontaminate.paths\[0\]: .* is a folder; name the evaluation"),
    ],
)
def test_a_bad_decontaminate_setting_is_named_before_ray_starts(tmp_path, over, says):
    from cerbero_ray.config import check

    cfg = data_stage(tmp_path / "o", {"s": {"path": str(tmp_path)}}, decontaminate=over)
    with pytest.raises(ValueError, match=says):
        check("data", cfg)


def test_an_evaluation_file_the_size_of_a_corpus_is_refused_before_ray_starts(tmp_path):
    """A training corpus named among the evaluation sets by mistake: every run of its words would be
    held in the driver's memory. Refused by its size (a sparse file: no gigabyte written)."""
    from cerbero_ray.config import check
    from cerbero_ray.config.data import EVAL_MAX_BYTES

    big = tmp_path / "corpus.jsonl"
    with open(big, "wb") as f:
        f.truncate(EVAL_MAX_BYTES + 1)
    cfg = data_stage(tmp_path / "o", {"s": {"path": str(tmp_path)}}, decontaminate={"paths": [SQUAD, str(big)]})
    with pytest.raises(ValueError, match=r"data.decontaminate.paths\[1\]: .*corpus.jsonl is 1.0 GiB, over the 1 GiB"):
        check("data", cfg)
    with open(big, "wb") as f:
        f.truncate(EVAL_MAX_BYTES)  # at the limit: taken
    check("data", cfg)


@pytest.mark.integration
def test_the_stage_drops_documents_quoting_an_evaluation_set(ray_local, tmp_path, caplog):
    from cerbero_ray.data.manifest import format_summary
    from cerbero_ray.data.pipeline import run_data

    context = json.load(open(SQUAD))["data"][1]["paragraphs"][0]["context"]
    rng = random.Random(7)
    chat = lambda user, answer: {  # noqa: E731
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }
    question = json.load(open(SQUAD))["data"][1]["paragraphs"][0]["qas"][1]["question"]  # 10 words
    rows = [chat("Parlami di questo.", context), chat("Ciao", prose(rng, 40)), chat("Ciao", prose(rng, 40))]
    rows.append(chat(f"Rispondi: {question}", prose(rng, 20)))  # the whole question, in a user turn
    src = write_jsonl(tmp_path / "chat.jsonl", rows)
    squad = tmp_path / "squad.json"
    squad.write_bytes(open(SQUAD, "rb").read())
    cfg = data_stage(
        tmp_path / "out",
        {"chat": {"path": src, "format": "openai"}},
        seq_len=512,
        dedup="none",  # the pass runs for the evaluation sets alone
        decontaminate={"paths": [str(squad)]},
    )
    m = run_data(cfg)
    assert m["documents"] == 2 and m["rejects_by_reason"] == {"contaminated": 2}
    assert m["dedup"]["evaluation_sets"] == {str(squad): 2} and m["dedup"]["mode"] == "none"
    assert (m["dedup"]["ngram"], m["dedup"]["min_words"]) == (13, 8)
    # the file's identity as the evaluate stage computes it (results.md matches the two)
    from cerbero_ray.inputs import file_hash

    assert m["dedup"]["evaluation_sha256"] == {str(squad): file_hash(SQUAD)}
    rejects = [json.loads(x) for f in m["rejects_files"] for x in open(f)]
    assert sorted(r["line_no"] for r in rejects) == [1, 4]
    whole = "(or one of its texts of 8 to 12 words whole)"
    assert {r["detail"] for r in rejects} == {f"shares a passage of 13 words {whole} with the evaluation set {squad}"}
    said = format_summary(m, str(tmp_path / "out"))
    assert "dedup         off" in said
    assert "contaminated  2 document(s) sharing 13 words or holding a text of 8+ words with an evaluation set" in said
    assert run_data(cfg) == m  # the same config, inputs and evaluation files: up to date
    # the evaluation file edited since (a newer release of the set): the shards are not up to date
    squad.write_bytes(open(SQUAD, "rb").read() + b"\n")
    with pytest.raises(FileExistsError, match="checked against the evaluation files of data.decontaminate.paths"):
        run_data(cfg)
    squad.unlink()
    with pytest.raises(ValueError, match=r"data.decontaminate.paths\[0\]: no such file"):
        run_data(cfg)  # gone: named, before any work


@pytest.mark.integration
def test_sources_with_no_document_pass_through_the_pass_both_ways(ray_local, tmp_path, monkeypatch):
    """A file of broken rows only gives the pass a batch of no fingerprint (on the Ray Data path,
    beside a file that has some); a run where no row parses gives it none at all."""
    import cerbero_ray.data.pipeline as pipeline
    from cerbero_ray.data.pipeline import run_data

    broken = write_jsonl(tmp_path / "broken.jsonl", [b"{oops", b"[1, 2", b"\xff"])
    good = write_jsonl(tmp_path / "good.jsonl", [{"text": prose(random.Random(8), 60)}] * 2)
    evals = {"paths": [SQUAD]}
    monkeypatch.setattr(pipeline, "LOCAL_PASS_BYTES", 0)
    both = {"broken": {"path": broken, "format": "text"}, "good": {"path": good, "format": "text"}}
    m = run_data(data_stage(tmp_path / "a", both, seq_len=256, dedup="near", decontaminate=evals))
    assert m["rejects_by_reason"] == {"invalid_json": 2, "invalid_utf8": 1, "duplicate": 1}
    assert (m["documents"], m["dedup"]["documents"]) == (1, 2)
    monkeypatch.setattr(pipeline, "LOCAL_PASS_BYTES", 1 << 30)
    only = {"broken": both["broken"]}
    m = run_data(data_stage(tmp_path / "b", only, seq_len=256, dedup="near", decontaminate=evals))
    assert m["documents"] == 0 and m["rejected"] == 3 and m["dedup"]["documents"] == 0
    assert m["dedup"]["evaluation_sets"] == {SQUAD: 0}


def test_decontamination_settings_shape_the_run_only_when_it_is_on(tmp_path):
    """Its ngram and min_words are part of what makes shards up to date when evaluation files are
    named, and nothing when none is: a run packed without them stays up to date."""
    from cerbero_ray.config import check
    from cerbero_ray.data.manifest import config_hash

    def h(**dc):
        return config_hash(check("data", data_stage(tmp_path / "o", {"s": {"path": str(tmp_path)}}, decontaminate=dc)))

    assert h() == h(ngram=20, min_words=9)
    assert len({h(paths=[SQUAD]), h(paths=[SQUAD], min_words=9), h(paths=[SQUAD], ngram=20), h()}) == 4
