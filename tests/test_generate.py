"""Generation: batched greedy decoding equals one prompt at a time; the prompts and self-chat jobs
write every row once, resume a lost chunk identically, self-chat output feeds the data stage, and
embedding dedup drops repeated conversations."""

import json
import os

import pyarrow.parquet as pq
import pytest

from cerbero_ray.config import compose, to_container
from cerbero_ray.data.pipeline import run_data
from cerbero_ray.generate import run_generate
from cerbero_ray.inference.generator import Generator
from cerbero_ray.inference.sampling import Sampling
from cerbero_ray.models import tiny
from conftest import SAMPLES, data_stage, write_jsonl

PROMPTS = ["Ciao!", "Qual è la capitale d'Italia? Rispondi in breve, per favore.", "Perché il cielo è blu?"]


def test_batched_greedy_equals_one_at_a_time(tok):
    gen = Generator(tiny().eval(), tok, batch_size=3)
    s = Sampling(max_new_tokens=12, temperature=0.0, stop=("[|Umano|]",))
    chats = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        for p in PROMPTS
    ]
    together = gen.generate(chats, s)
    alone = [gen.generate([c], s)[0] for c in chats]
    assert [r["text"] for r in together] == [r["text"] for r in alone]
    assert all(r["finish_reason"] in ("stop", "length") and r["new_tokens"] <= 12 for r in together)


def gen_cfg(tmp_path, checkpoint, inp, *extra):
    return to_container(
        compose(
            "generate",
            [
                f"paths.output_dir={tmp_path}",
                f"generate.checkpoint={checkpoint}",
                f"generate.input={inp}",
                "generate.sampling.max_new_tokens=8",
                *extra,
            ],
        )
    )


@pytest.mark.integration
def test_prompts_job_every_row_once_and_a_lost_chunk_comes_back_identical(tmp_path, tiny_hf, ray_local):
    inp = write_jsonl(
        tmp_path / "q.jsonl", [{"id": f"q{i}", "text": PROMPTS[i % 3]} for i in range(10)] + [{"id": "bad", "text": ""}]
    )
    s = run_generate(gen_cfg(tmp_path, tiny_hf, inp, "generate.chunk_rows=4"))
    parts = tmp_path / "generate" / "prompts" / "parts"
    first = {r["id"]: r for r in pq.read_table(parts).to_pylist()}
    assert len(first) == 11 and first["bad"]["error"] == "empty" and first["q0"]["completion"] is not None
    lost = sorted(os.listdir(parts))[1]
    os.remove(parts / lost)
    again = run_generate(gen_cfg(tmp_path, tiny_hf, inp, "generate.chunk_rows=4"))
    assert again["chunks_processed"] == 1 and again["chunks_skipped"] == s["chunks_processed"] - 1
    second = {r["id"]: r for r in pq.read_table(parts).to_pylist()}
    assert second == first  # seeded per chunk: regenerated exactly


@pytest.mark.integration
def test_a_model_actor_that_cannot_start_is_one_line(tmp_path, tiny_hf, ray_local, capsys):
    """More KV-cache slots than the node's memory holds: the model actor's check stops its start,
    and the job says so in one line (exit status 2), not Ray's three tracebacks."""
    from cerbero_ray.runtime import launch

    inp = write_jsonl(tmp_path / "q.jsonl", [{"id": "q0", "text": PROMPTS[0]}])
    with pytest.raises(SystemExit) as e:
        launch("generate", gen_cfg(tmp_path, tiny_hf, inp, "generate.batch_size=100000000"), ray=False)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: a model actor did not start: the engine's cache does not fit: 100000000 slots"), err


@pytest.mark.integration
def test_self_chat_output_feeds_the_data_stage(tmp_path, tiny_hf, ray_local):
    seeds = os.path.join(SAMPLES, "self_chat_seeds_it.txt")
    s = run_generate(
        gen_cfg(
            tmp_path,
            tiny_hf,
            seeds,
            "generate.mode=self_chat",
            "generate.self_chat.turns=2",
            "generate.self_chat.drop_unfinished=false",
            "generate.self_chat.user_max_new_tokens=6",
        )
    )
    convs = [json.loads(x) for x in open(s["output"])]
    assert s["conversations"] == len(convs) > 10
    assert all(c["messages"][0]["role"] == "user" and c["messages"][-1]["role"] == "assistant" for c in convs)
    manifest = run_data(
        data_stage(
            tmp_path / "data",
            {"chat": {"path": s["output"], "format": "auto", "weight": 1.0, "text_field": "text"}},
        )
    )
    assert manifest["documents"] == len(convs) and manifest["rejected"] == 0
    assert manifest["sources"]["chat"]["format"] == "openai"


@pytest.mark.integration
def test_self_chat_embedding_dedup_drops_every_repeated_conversation(tmp_path, tiny_hf, tok, ray_local):
    from transformers import BertConfig, BertModel

    seeds = [x for x in open(os.path.join(SAMPLES, "self_chat_seeds_it.txt")).read().splitlines() if x.strip()][:6]
    inp = tmp_path / "seeds.txt"
    inp.write_text("\n".join(seeds + seeds[:4]) + "\n")  # 4 seeds twice: greedy makes the same conversation twice
    encoder = tmp_path / "encoder"  # a sentence-embedding model's place: an HF encoder with its tokenizer
    BertModel(
        BertConfig(vocab_size=32000, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(encoder)
    tok.save_pretrained(encoder)
    for name, extra in (("own", []), ("encoder", [f"generate.self_chat.dedup_model={encoder}"])):
        s = run_generate(
            gen_cfg(
                tmp_path / name,
                tiny_hf,
                inp,
                "generate.mode=self_chat",
                "generate.chunk_rows=4",
                "generate.self_chat.turns=1",
                "generate.self_chat.drop_unfinished=false",
                "generate.sampling.temperature=0",
                "generate.self_chat.dedup=embedding",
                *extra,
            )
        )
        parts = [
            r for r in pq.read_table(tmp_path / name / "generate" / "self_chat" / "parts").to_pylist() if r["messages"]
        ]
        assert all(len(r["embedding"]) == 2 * (64 if name == "own" else 32) for r in parts)  # float16 vectors
        repeats = len(parts) - len({r["messages"] for r in parts})
        kept = [json.dumps(json.loads(x)["messages"]) for x in open(s["output"])]
        assert repeats >= 1 and len(kept) == len(set(kept)) == s["conversations"]
        assert s["near_duplicates"] >= repeats and s["conversations"] + s["near_duplicates"] == len(parts)
        if name == "own":  # centred, the model's states tell its different conversations apart (here: all of them)
            assert s["near_duplicates"] == repeats
        # the random-init encoder only stands in for loading and pooling: its states (uncentred, as a
        # trained sentence-embedding model's should be) are nearly parallel, so it flags most pairs


def test_constrained_answers_and_self_chat_turns_follow_their_format(tmp_path, tiny_hf):
    """``generate.constraint`` holds each answer (prompts mode) or each assistant turn (self_chat) to
    a format, ``generate.user_constraint`` each human turn; a constraint that cannot run, or one on
    the hf engine, is named at compose time. The workers run as Ray's actors would, without Ray."""
    import re

    from cerbero_ray import batchjob
    from cerbero_ray.config import check
    from cerbero_ray.generate.pipeline import GenerateWorker, run_identity

    inp = write_jsonl(tmp_path / "q.jsonl", [{"id": f"q{i}", "text": p} for i, p in enumerate(PROMPTS * 2)])
    base = [f"paths.output_dir={tmp_path}", f"generate.checkpoint={tiny_hf}", f"generate.input={inp}"]
    choice = ["generate.constraint.kind=choice", "generate.constraint.value=['sì',no,forse]"]
    gc = check("generate", compose("generate", [*base, *choice, "generate.sampling.max_new_tokens=8"])).generate
    GenerateWorker(gc).process(batchjob.plan_chunks(str(inp), "auto", 64)[0][0])
    rows = pq.read_table(f"{gc.output_dir}/parts").to_pylist()
    assert len(rows) == 6 and {r["completion"] for r in rows} <= {"sì", "no", "forse"}
    assert run_identity(gc)["constraint"] == {"kind": "choice", "value": ["sì", "no", "forse"]}
    plain = check("generate", compose("generate", base)).generate
    assert "constraint" not in run_identity(plain)  # an unconstrained run's folder is what it was
    assert "frequency_penalty" not in run_identity(plain)["sampling"]  # so is one without penalties
    pen = check("generate", compose("generate", [*base, "generate.sampling.presence_penalty=0.5"])).generate
    assert run_identity(pen)["sampling"]["presence_penalty"] == 0.5
    biased = check("generate", compose("generate", [*base, "+generate.sampling.logit_bias={5: -100, 7: 2.5}"]))
    from cerbero_ray.generate.pipeline import run_generate

    with pytest.raises(
        ValueError, match=r"generate.sampling.logit_bias: token id\(s\) \[40000\] outside .*'s vocabulary"
    ):
        run_generate(compose("generate", [*base, "+generate.sampling.logit_bias={40000: 1}"]))  # before Ray is asked
    assert (
        biased.generate.sampling.logit_bias == {5: -100.0, 7: 2.5} and "logit_bias" not in run_identity(pen)["sampling"]
    )
    ask = r"Domanda: [a-z ]{4,30}\?"
    chat = [
        *base,
        "generate.mode=self_chat",
        "generate.self_chat.turns=2",
        "generate.self_chat.min_chars=1",
        "generate.self_chat.dedup=none",
        "generate.constraint.kind=regex",
        "generate.constraint.value='Risposta: [a-z ]{4,30}\\.'",
        "generate.user_constraint.kind=regex",
        f"generate.user_constraint.value='{ask}'",
        "generate.sampling.max_new_tokens=40",
        "generate.self_chat.user_max_new_tokens=40",
    ]
    sc = check("generate", compose("generate", chat)).generate
    GenerateWorker(sc).process(batchjob.plan_chunks(str(inp), "auto", 64)[0][0])
    convs = [json.loads(r["messages"]) for r in pq.read_table(f"{sc.output_dir}/parts").to_pylist() if r["messages"]]
    assert convs and any(len(c) == 4 for c in convs)
    for c in convs:
        assert all(re.fullmatch(r"Risposta: [a-z ]{4,30}\.", m["content"]) for m in c if m["role"] == "assistant")
        assert all(re.fullmatch(ask, m["content"]) for m in c[1:] if m["role"] == "user")
    for bad, says in [
        (["generate.constraint.kind=regex", "generate.constraint.value='(?<=a)b'"], "generate.constraint: constrained"),
        (["generate.constraint.kind=choice", "generate.constraint.value=[]"], "generate.constraint: a choice list"),
        (["generate.constraint.kind=yaml"], "generate.constraint: unknown constraint"),
        (["generate.constraint.value=[a]"], "generate.constraint.value is set but"),
        ([*choice, "generate.engine=hf"], "runs on engine=continuous"),
        (["generate.user_constraint.kind=json_object"], "generate.user_constraint: the human's turns are self_chat"),
        (["generate.sampling.frequency_penalty=2.5"], r"generate.sampling.frequency_penalty must be in \[-2, 2\]"),
        (["generate.sampling.presence_penalty=nan"], r"generate.sampling.presence_penalty must be in \[-2, 2\]"),
        (["+generate.sampling.logit_bias={5: 200}"], r"generate.sampling.logit_bias.5 must be in \[-100, 100\]"),
        (["generate.sampling.repetition_penalty=0"], r"generate.sampling.repetition_penalty must be in \(0, 10\]"),
    ]:
        with pytest.raises(ValueError, match=says):
            check("generate", compose("generate", [*base, *bad]))
