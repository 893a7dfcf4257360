"""Continuous batching: the slot-cache forward gives the HF model's logits; greedy text equals
transformers' generate whatever the arrival order and the number of slots (and a randomized mix of
arrivals, budgets and clients that leave equals each request alone); stop strings, streaming,
seeded sampling, cancellation and bad requests behave. CPU, tiny model, no Ray."""

import threading
import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from cerbero_ray.chat import SYSTEM_LINE
from cerbero_ray.inference.continuous import ContinuousBatcher, sample
from cerbero_ray.inference.generator import Generator
from cerbero_ray.inference.prefix import SlotPrefixes, common_prefix
from cerbero_ray.inference.sampling import Sampling
from cerbero_ray.inference.slots import SlotModel
from cerbero_ray.models import tiny
from cerbero_ray.tokenizer import encode_prompts
from conftest import DEVICES, counting_prefill

PROMPTS = [
    "Ciao!",
    "Qual è la capitale d'Italia? Rispondi in breve, per favore.",
    "Perché il cielo è blu?",
    "Scrivi una frase sul mare " * 6,
    "Dimmi un proverbio.",
]
GREEDY = Sampling(max_new_tokens=16, temperature=0.0, stop=("[|Umano|]",))
GREEDY_20 = Sampling(max_new_tokens=20, temperature=0.0, stop=())


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


def chat(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("device", DEVICES)
def test_a_cache_larger_than_free_memory_is_refused_naming_the_slots_that_fit(tok, device, monkeypatch):
    """Before any of it is allocated: a GPU's out-of-memory error names no setting, and on a host
    the kernel kills the process."""
    from cerbero_ray.inference import slots

    model = tiny().to(device).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    per = slots.slot_bytes(model.config, model.model.layers[0].self_attn.head_dim, 64, torch.float32, vocab)
    assert per > 2 * model.config.num_hidden_layers * 64 * model.config.num_key_value_heads * 4 + 9 * vocab
    with monkeypatch.context() as m:
        m.setattr(slots, "free_memory", lambda device: int(per * 5 / slots.CACHE_SHARE) + 1)
        sm = SlotModel(model, num_slots=5, max_len=64)  # fits
        held = (sm.k, sm.v, sm.counts, sm.bias, sm.in_prompt, sm.bits)  # every per-slot tensor the engine keeps
        assert sum(t.numel() * t.element_size() for t in held) == 5 * per  # slot_bytes is what is allocated
        with pytest.raises(ValueError, match=r"6 slots of 64 positions need .*: 5 slots fit at this length\. Lower"):
            SlotModel(model, num_slots=6, max_len=64)
    free = slots.free_memory(torch.device(device))  # the device's own: a GPU's, or the host's MemAvailable
    assert free is not None and 0 < free
    huge = int(free / per) + 1  # more slots than the device holds: refused, not allocated
    with pytest.raises(ValueError, match=rf"{huge} slots of 64 positions .*\d+ slots fit"):
        ContinuousBatcher(model, tok, num_slots=huge, max_prompt_tokens=32, max_new_tokens=32, cuda_graphs=False)


@pytest.mark.parametrize("window", [None, 6])
def test_slot_cache_logits_equal_the_hf_forward(window):
    m = tiny(overrides={"sliding_window": window}).eval()
    seqs = [[1, 5, 9, 400, 31, 7, 8, 99, 12, 13, 14, 15], [1, 100, 200, 300], [1, 42, 43, 44, 45, 46, 47, 48, 49]]
    slots = [2, 0, 1]  # out of order, and prompts of different lengths in one right-padded prefill
    start = [8, 3, 5]  # the first is longer than the window
    sm = SlotModel(m, num_slots=3, max_len=32)
    with torch.no_grad():
        ref = [m(torch.tensor([s])).logits[0] for s in seqs]
    got = sm.prefill([s[:k] for s, k in zip(seqs, start)], slots)
    for i in range(3):
        torch.testing.assert_close(got[i], ref[i][start[i] - 1], rtol=1e-4, atol=1e-4)
    for t in range(3, 12):
        ids, pos = torch.zeros(3, dtype=torch.long), torch.full((3,), -1)  # -1: the slot sits this step out
        live = [i for i, s in enumerate(seqs) if start[i] <= t < len(s)]
        for i in live:
            ids[slots[i]], pos[slots[i]] = seqs[i][t], t
        out = sm.decode(ids, pos)
        for i in live:
            torch.testing.assert_close(out[slots[i]], ref[i][t], rtol=1e-4, atol=1e-4)


def test_greedy_text_equals_transformers_generate_with_staggered_arrivals(model, tok):
    prompts = [chat(tok, p) for p in PROMPTS]
    ref = [Generator(model, tok, batch_size=1).generate([p], GREEDY)[0] for p in prompts]
    cb = ContinuousBatcher(
        model, tok, num_slots=2, max_prompt_tokens=128, max_new_tokens=32
    )  # fewer slots than requests
    out = [None] * len(prompts)

    def one(i):
        out[i] = cb.generate([prompts[i]], GREEDY)[0]

    threads = []
    for i in range(len(prompts)):
        threads.append(threading.Thread(target=one, args=(i,)))
        threads[-1].start()
        time.sleep(0.01 * i)  # later requests join a batch already decoding
    for t in threads:
        t.join(60)
    for r, e in zip(out, ref):
        assert (r["text"], r["finish_reason"], r["new_tokens"], r["prompt_tokens"]) == (
            e["text"],
            e["finish_reason"],
            e["new_tokens"],
            e["prompt_tokens"],
        )
    assert cb.live == {}


def test_stop_string_cuts_the_text_and_the_stream_adds_up(model, tok):
    cb = ContinuousBatcher(model, tok, num_slots=4, max_prompt_tokens=128, max_new_tokens=32)
    prompt = chat(tok, PROMPTS[2])
    full = cb.generate([prompt], Sampling(max_new_tokens=24, temperature=0.0, stop=()))[0]
    assert full["finish_reason"] == "length" and full["new_tokens"] == 24
    stop = full["text"][10:13]  # a string the greedy answer is known to contain
    s = Sampling(max_new_tokens=24, temperature=0.0, stop=("[|Umano|]", stop))
    pieces = list(cb.stream(prompt, s))
    end = pieces.pop()
    assert end["finish_reason"] == "stop" and end["new_tokens"] < 24
    assert "".join(pieces).strip() == end["text"]
    assert end["text"] == full["text"][: full["text"].index(stop)].strip()
    assert all(isinstance(p, str) and p for p in pieces)


def test_seeded_sampling_is_the_same_whatever_shares_the_batch(model, tok):
    cb = ContinuousBatcher(model, tok, num_slots=4, max_prompt_tokens=128, max_new_tokens=32)
    s = Sampling(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    alone = cb.generate([chat(tok, PROMPTS[0])], s)[0]["text"]
    crowded = cb.generate([chat(tok, p) for p in PROMPTS], s)[0]["text"]
    other = cb.generate([chat(tok, PROMPTS[0])], Sampling(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=8))
    greedy = cb.generate([chat(tok, PROMPTS[0])], Sampling(max_new_tokens=12, temperature=0.0))[0]["text"]
    assert alone == crowded
    assert {alone, other[0]["text"]} != {greedy}  # it samples (a random tiny model is far from peaked)


def test_sample_greedy_nucleus_and_frequencies():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]] * 1000))
    u = (torch.arange(1000, dtype=torch.float32) + 0.5) / 1000
    ones, zero = torch.ones(1000), torch.zeros(1000)
    assert (sample(logits, zero, ones, u) == 0).all()  # temperature 0: argmax
    assert (sample(logits, ones, torch.full((1000,), 0.4), u) == 0).all()  # the nucleus is the top token
    counts = np.bincount(sample(logits, ones, torch.full((1000,), 0.7), u).numpy(), minlength=4)
    np.testing.assert_allclose(counts / 1000, [0.5 / 0.8, 0.3 / 0.8, 0, 0], atol=0.002)  # top-p 0.7: two tokens
    counts = np.bincount(sample(logits, ones, ones, u).numpy(), minlength=4)
    np.testing.assert_allclose(counts / 1000, [0.5, 0.3, 0.15, 0.05], atol=0.002)


def test_closing_a_stream_frees_its_slot_and_others_go_on(model, tok):
    cb = ContinuousBatcher(model, tok, num_slots=1, max_prompt_tokens=128, max_new_tokens=64)
    it = cb.stream(chat(tok, PROMPTS[1]), Sampling(max_new_tokens=64, temperature=0.0, stop=()))
    next(it)
    it.close()  # the client went away
    r = cb.generate([chat(tok, PROMPTS[0])], GREEDY)[0]  # one slot: it runs only if the cancelled one left
    assert r["new_tokens"] >= 1
    assert cb.live == {}


def test_event_loop_interface_gives_the_same_text_and_frees_a_dropped_stream(model, tok):
    import asyncio

    cb = ContinuousBatcher(model, tok, num_slots=1, max_prompt_tokens=128, max_new_tokens=64)
    prompt = chat(tok, PROMPTS[2])
    want = cb.generate([prompt], GREEDY)[0]

    async def main():
        got = await asyncio.gather(cb.agenerate(prompt, GREEDY), cb.agenerate(prompt, GREEDY))
        pieces = [p async for p in cb.astream(prompt, GREEDY)]
        dropped = cb.astream(prompt, Sampling(max_new_tokens=64, temperature=0.0, stop=()))
        await dropped.__anext__()
        await dropped.aclose()  # the client went away
        after = await asyncio.wait_for(cb.agenerate(prompt, GREEDY), 30)  # one slot: free again
        return got, pieces, after

    got, pieces, after = asyncio.run(main())
    assert [g["text"] for g in got] == [want["text"]] * 2 and after["text"] == want["text"]
    assert "".join(pieces[:-1]).strip() == want["text"] and pieces[-1]["new_tokens"] == want["new_tokens"]

    # ids the caller encoded already (the server does it off the loop, for its limit check) are not
    # encoded again, and give the same text
    (ids,), _ = cb.encode([prompt])
    cb.encode = None  # any second encode would fail

    async def pre_encoded():
        one = await cb.agenerate(prompt, GREEDY, ids)
        return one, [p async for p in cb.astream(prompt, GREEDY, ids)]

    one, streamed = asyncio.run(pre_encoded())
    assert one["text"] == want["text"] and one["prompt_tokens"] == want["prompt_tokens"]
    assert "".join(streamed[:-1]).strip() == want["text"]


def test_bad_requests_and_truncation(model, tok):
    cb = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=16, max_new_tokens=8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        cb.submit([1, 2, 3], Sampling(max_new_tokens=9), lambda x: None)
    with pytest.raises(ValueError, match="empty"):
        cb.submit([], Sampling(max_new_tokens=4), lambda x: None)
    with pytest.raises(ValueError, match="prompt tokens"):
        cb.submit(list(range(1, 18)), Sampling(max_new_tokens=4), lambda x: None)
    with pytest.raises(ValueError, match=r"logit_bias: token id\(s\) \[32000\] outside the vocabulary \(0..31999\)"):
        cb.submit([1, 2, 3], Sampling(max_new_tokens=4, logit_bias={5: 1.0, 32000: 1.0}), lambda x: None)
    with pytest.raises(ValueError, match=r"logit_bias: token id\(s\) \[32000\] outside the vocabulary"):
        Generator(model, tok).generate(["ciao"], Sampling(max_new_tokens=4, logit_bias={32000: -100.0}))
    r = cb.generate(["parola " * 40], Sampling(max_new_tokens=4, temperature=0.0, stop=()))[0]
    assert r["truncated"] and r["prompt_tokens"] == 16 and r["new_tokens"] == 4


def test_long_chats_lose_their_oldest_exchanges_alike_in_both_engines(model, tok):
    msgs = []
    for k in range(6):
        msgs += [
            {"role": "user", "content": f"Domanda {k} </s> <s>"},
            {"role": "assistant", "content": f"Risposta {k}"},
        ]
    prompt = tok.apply_chat_template(
        msgs + [{"role": "user", "content": "E ora?"}], tokenize=False, add_generation_prompt=True
    )
    (kept,), _ = encode_prompts(tok, [prompt], 80)
    short = "<s>" + tok.decode(kept[1:])  # the truncated prompt as text: system line, the last exchanges
    assert short.startswith("<s>" + SYSTEM_LINE + "\n[|Umano|] Domanda ") and short.endswith("E ora?\n[|AI|]")
    ref = Generator(model, tok, max_prompt_tokens=1024).generate([short], GREEDY)[0]
    gen = Generator(model, tok, max_prompt_tokens=80).generate([prompt], GREEDY)[0]
    cont = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=80, max_new_tokens=16).generate(
        [prompt], GREEDY
    )[0]
    for r in (gen, cont):
        assert r["truncated"] and r["prompt_tokens"] == len(kept) <= 80
        assert (r["text"], r["new_tokens"]) == (ref["text"], ref["new_tokens"])


def test_other_architectures_are_refused_with_a_clear_error(tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="serve.engine=hf"):
        ContinuousBatcher(m, tok)


@pytest.mark.parametrize("device", DEVICES)
def test_graph_decoding_matches_eager_decoding(tok, device):
    """bf16; on CUDA the graphed step (two length buckets) against the eager one, on CPU (no graphs:
    ``cuda_graphs`` is ignored there) two eager runs."""
    cuda = device == "cuda"
    m = tiny(dtype="bfloat16").to(device).eval()
    sm = SlotModel(m, num_slots=4, max_len=160)
    prompts = [tok(chat(tok, p), add_special_tokens=False).input_ids for p in PROMPTS[:4]]
    nxt = sm.prefill(prompts, [0, 1, 2, 3]).argmax(-1).cpu()
    pos = torch.tensor([len(p) for p in prompts])
    for _ in range(60 if cuda else 8):  # on CUDA: crosses from the 128 bucket into the 160 one
        eager, graphed = sm.decode(nxt, pos, graphs=False), sm.decode(nxt, pos, graphs=cuda)
        torch.testing.assert_close(graphed, eager, rtol=2e-2, atol=2e-2)
        nxt, pos = eager.argmax(-1).cpu(), pos + 1
    # varlen attention (CUDA, when this torch has it) reads real lengths: one graph for every length
    assert sm.graph_error is None and len(sm.graphs) == ((1 if sm.attention == "varlen" else 2) if cuda else 0)
    cb = ContinuousBatcher(m, tok, num_slots=4, max_prompt_tokens=96, max_new_tokens=64, cuda_graphs=True)
    out = cb.generate([chat(tok, p) for p in PROMPTS], Sampling(max_new_tokens=40, temperature=0.0, stop=()))
    assert bool(cb.slots.step_graphs) == cuda and all(r["new_tokens"] >= 1 for r in out)
    assert cb.slots.graph_error is None and cb.slots.compile_error is None


@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_with_graphs_gives_generate_s_text_and_seeded_samples(tok, device):
    """The whole loop with ``cuda_graphs=True`` (graph decoding and device logits on CUDA), fp32 so
    that greedy text, with penalties too, can be compared with transformers' generate token for token."""
    m = tiny().to(device).eval()
    prompts = [chat(tok, p) for p in PROMPTS]
    ref = [Generator(m, tok, batch_size=1).generate([p], GREEDY)[0]["text"] for p in prompts]
    cb = ContinuousBatcher(m, tok, num_slots=4, max_prompt_tokens=128, max_new_tokens=32, cuda_graphs=True)
    assert [r["text"] for r in cb.generate(prompts, GREEDY)] == ref
    pen = replace(GREEDY, frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3)  # in the graphs
    assert [r["text"] for r in cb.generate(prompts, pen)] == [
        r["text"] for r in Generator(m, tok).generate(prompts, pen)
    ]
    s = Sampling(max_new_tokens=12, temperature=0.9, top_p=0.95, seed=7)
    assert cb.generate(prompts[:1], s)[0]["text"] == cb.generate(prompts, s)[0]["text"]
    assert bool(cb.slots.step_graphs) == (device == "cuda") and cb.slots.graph_error is None
    assert cb.slots.fast == (device == "cuda") and cb.slots.compile_error is None


@pytest.mark.parametrize("device", DEVICES)
def test_steps_replay_the_smallest_batch_bucket_that_holds_their_slots(model, tok, cpu_graphs, device):
    """Graphs per batch-size bucket (CUDA graphs; on the CPU :func:`conftest.cpu_graphs`' stand-in):
    start-up captures every bucket, a step replays the smallest that holds its highest live slot as
    requests end, and each request's text (greedy, seeded samples, a constrained row's two halves)
    equals the eager engine's for it alone."""
    pytest.importorskip("llguidance")
    from cerbero_ray.inference import grammar as G

    cuda = device == "cuda"
    m = tiny().to(device).eval() if cuda else model
    prompts = [chat(tok, p) for p in PROMPTS] + [chat(tok, "Dov'è Napoli?")]
    items = [  # the lowest slot decodes longest: the highest live slot falls 6, 5, ... 1 as they end
        (p, Sampling(max_new_tokens=14 - 2 * i, temperature=0.0 if i % 2 else 0.8, seed=i, stop=()), 0)
        for i, p in enumerate(prompts)
    ]
    digits = Sampling(max_new_tokens=20, temperature=0.0, stop=(), grammar=G.grammar("regex", r"[0-9]{100}"))
    kw = dict(num_slots=8, max_prompt_tokens=128, max_new_tokens=24)
    eager = ContinuousBatcher(m, tok, cuda_graphs=False, **kw)
    cb = ContinuousBatcher(m, tok, cuda_graphs=True, **kw) if cuda else cpu_graphs(ContinuousBatcher(m, tok, **kw))
    assert cb.slots.batch_buckets == [1, 2, 4, 8] and cb.slots.warm_s is not None
    assert "CUDA graphs for batch sizes [1, 2, 4, 8] in " in cb.describe() and "HF modules" in eager.describe()
    length = cb.slots._bucket(1)  # 128, or the cache's whole length (varlen/flex attention)
    assert set(cb.slots.step_graphs) == {(length, b, s) for b in (1, 2, 4, 8) for s in (False, True)}

    def rows(key):  # (length, rows, sampling), ("forward", length, rows), ("pick", length, rows, sampling)
        return key[2] if isinstance(key[0], str) else key[1]

    for batch in (items, [(prompts[0], digits, 0)] + items[1:]):
        want = [eager.run([it])[0] for it in batch]
        for g in cb.slots.step_graphs.values() if not cuda else ():
            g[0].replays = 0
        got = cb.run(batch)
        assert [(r["text"], r["new_tokens"]) for r in got] == [(r["text"], r["new_tokens"]) for r in want]
        if not cuda:  # which graphs ran (the stand-in counts its replays)
            replayed = {k for k, g in cb.slots.step_graphs.items() if g[0].replays}
            assert {rows(k) for k in replayed} == {1, 2, 4, 8}
    assert {k[0] for k in cb.slots.step_graphs if isinstance(k[0], str)} == {"forward", "pick"}
    for key, (_, out) in cb.slots.step_graphs.items():  # each graph runs its bucket's rows, no more
        assert (out if key[0] == "forward" else out[0]).shape[0] == rows(key), key
    assert got[0]["text"].isdigit() and cb.slots.graph_error is None and cb.slots.compile_error is None
    assert not cb.live and cb.pending is None or all(r.done for r in cb.pending.rows)


def test_batch_buckets_default_and_chosen():
    from cerbero_ray.inference.slots import batch_buckets

    assert batch_buckets(1) == [1] and batch_buckets(3) == [1, 2, 3] and batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32] and batch_buckets(20) == [1, 2, 4, 8, 16, 20]
    assert batch_buckets(16, [4, 4, 1]) == [1, 4, 16] and batch_buckets(16, []) == [16]
    for bad in ([0], [17], [2.5], [True]):
        with pytest.raises(ValueError, match="graph batch sizes"):
            batch_buckets(16, bad)


def test_engine_config_errors_name_the_key(tmp_path, tiny_hf):
    import json

    from cerbero_ray.checkpoints import check_inference
    from cerbero_ray.config import compose

    sc = compose("serve", [f"serve.checkpoint={tiny_hf}"], checked=True).serve
    check_inference(sc["checkpoint"], sc["engine"], "serve")  # the tiny Mistral: fine
    with pytest.raises(ValueError, match="serve.engine must be one of"):
        compose("serve", [f"serve.checkpoint={tiny_hf}", "serve.engine=vllm"], checked=True)
    with pytest.raises(ValueError, match="serve.decode_attention must be one of"):
        compose("serve", [f"serve.checkpoint={tiny_hf}", "serve.decode_attention=paged"], checked=True)
    with pytest.raises(ValueError, match="serve.decode_attention=flex is the fast decode step's"):
        compose(
            "serve",
            [f"serve.checkpoint={tiny_hf}", "serve.decode_attention=flex", "serve.fast_decode=false"],
            checked=True,
        )
    for sizes in ("[0,4]", "[4,17]"):  # max_batch_size 16
        with pytest.raises(ValueError, match=r"serve.graph_batch_sizes must lie within 1..serve.max_batch_size \(16\)"):
            compose("serve", [f"serve.checkpoint={tiny_hf}", f"serve.graph_batch_sizes={sizes}"], checked=True)
    for bad in (["serve.prefix_store_gib=-1"], ["serve.prefix_store_gib=1", "serve.prefix_cache=false"]):
        with pytest.raises(ValueError, match=r"serve.prefix_store_gib=.*needs serve.engine=continuous and serve.pref"):
            compose("serve", [f"serve.checkpoint={tiny_hf}", *bad], checked=True)
    over = ["serve.graph_batch_sizes=[1,8]", "serve.prefix_store_gib=0.5"]
    sc = compose("serve", [f"serve.checkpoint={tiny_hf}", *over], checked=True).serve
    assert list(sc.graph_batch_sizes) == [1, 8]
    from cerbero_ray.serve.engine import ServeEngine

    se = ServeEngine(
        tiny_hf,
        max_batch_size=sc.max_batch_size,
        graph_batch_sizes=sc.graph_batch_sizes,
        prefix_store_gib=sc.prefix_store_gib,
    )
    page = 64 * se.batcher.slots.token_bytes()  # STORE_PAGE positions
    assert se.batcher.slots.batch_buckets == [1, 8, 16] and se.batcher.store.pages == 2**29 // page
    assert "a host prefix store of 0.50 GiB (" in se.batcher.describe()
    se.batcher.close()
    with pytest.raises(ValueError, match="needs prefix reuse"):
        ContinuousBatcher(tiny(), None, num_slots=1, prefix_cache=False, prefix_store_bytes=1)
    with pytest.raises(ValueError, match="holds not one page of 64 tokens"):
        ContinuousBatcher(tiny(), se.tok, num_slots=1, prefix_store_bytes=page - 1)
    with pytest.raises(ValueError, match=r"the host prefix store does not fit: .* GiB asked \(serve.prefix_store"):
        ContinuousBatcher(tiny(), se.tok, num_slots=1, prefix_store_bytes=2**50)

    def refused(*a, **k):
        raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")

    with pytest.MonkeyPatch.context() as mp:  # what a GPU host that will not lock the memory says
        mp.setattr(SlotModel, "host_pool", refused)
        with pytest.raises(ValueError, match=r"the host prefix store \(.* GiB, serve.prefix_store_gib\) could not"):
            ContinuousBatcher(tiny(), se.tok, num_slots=1, prefix_store_bytes=page)
    from cerbero_ray.config.serve import DECODE_ATTENTION
    from cerbero_ray.inference.slots import ATTENTION

    assert DECODE_ATTENTION == ATTENTION
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="serve.engine=hf"):
        check_inference(str(tmp_path), sc["engine"], "serve")
    check_inference(str(tmp_path), "hf", "serve")
    with pytest.raises(ValueError, match="generate.engine must be one of"):
        compose("generate", [f"generate.checkpoint={tiny_hf}", "generate.engine=fast"], checked=True)


@pytest.mark.parametrize("attention", ["auto", "flex"])
@pytest.mark.parametrize("window", [None, 6])
def test_the_fast_decode_step_gives_the_module_path_s_logits_and_shares_the_weights(window, attention):
    """The fused step (one QKV and one gate/up weight, the norm/rope/MLP functions; attention by
    masked SDPA or by flex_attention over each row's blocks, eager here) against the HF modules'
    step, row by row, with a slot sitting out; the modules' weights become views of the fused ones
    (no memory added, the same numbers), and a second engine reuses them."""
    from cerbero_ray.inference.slots import fast_unsupported

    m = tiny(overrides={"sliding_window": window}).eval()
    ref_sd = {k: v.clone() for k, v in m.state_dict().items()}
    plain = SlotModel(m, num_slots=3, max_len=32, fast=False)
    fast = SlotModel(m, num_slots=3, max_len=32, fast=True, attention=attention)
    # varlen: CUDA only; flex: its start-up check against SDPA passed
    assert not plain.fast and fast.fast and fast.attention == ("sdpa" if attention == "auto" else "flex")
    a = m.model.layers[0].self_attn
    assert a.k_proj.weight.untyped_storage().data_ptr() == a._cerbero_qkv.untyped_storage().data_ptr()
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in ref_sd.items())
    again = SlotModel(m, num_slots=2, max_len=16, fast=True)
    assert again._fused[0].qkv is fast._fused[0].qkv
    seqs = [[1, 5, 9, 400, 31, 7, 8, 99, 12, 13], [1, 100, 200, 300], [1, 42, 43, 44, 45, 46, 47]]
    for sm in (plain, fast):
        sm.prefill([s[:3] for s in seqs], [0, 1, 2])
    for t in range(3, 10):
        ids = torch.tensor([s[t] if t < len(s) else 0 for s in seqs])
        pos = torch.tensor([t if t < len(s) else -1 for s in seqs])
        got, want = fast.decode(ids, pos), plain.decode(ids, pos)
        live = pos >= 0
        torch.testing.assert_close(got[live], want[live], rtol=1e-4, atol=1e-4)
    assert fast_unsupported(tiny(overrides={"hidden_act": "gelu"})) == "hidden_act=gelu"


@pytest.mark.parametrize("window", [None, 200])
def test_flex_block_masks_list_exactly_the_blocks_each_row_sees(window):
    """The decode block mask (flex_attention's kernels read only the listed blocks, whole ones
    without the mask): each row's listed blocks are exactly those holding a key it sees, the whole
    ones entirely visible, the cut ones partly, none listed twice; brute force over positions at
    and around block edges."""
    from cerbero_ray.inference.slots import _FLEX_BLOCK as BS

    sm = SlotModel(tiny(overrides={"sliding_window": window}).eval(), num_slots=2, max_len=1024, fast=True)
    pos = torch.tensor([0, 1, 126, 127, 128, 129, 255, 256, 300, 1000, 1023])
    bm = sm._block_mask(pos, 1024)
    for r, p in enumerate(pos.tolist()):
        lo = max(0, p - window + 1) if window else 0
        seen = {b for b in range(1024 // BS) if b * BS <= p and b * BS + BS - 1 >= lo}
        whole = {b for b in seen if b * BS >= lo and b * BS + BS - 1 <= p}
        n, idx = int(bm.full_kv_num_blocks[r, 0, 0]), bm.full_kv_indices[r, 0, 0].tolist()
        c, cidx = int(bm.kv_num_blocks[r, 0, 0]), bm.kv_indices[r, 0, 0].tolist()
        assert set(idx[:n]) == whole and len(idx[:n]) == n, (p, idx[:n], whole)
        assert set(cidx[:c]) == seen - whole and len(set(cidx[:c])) == c, (p, cidx[:c], seen - whole)


@pytest.mark.parametrize("device", DEVICES)
def test_the_engine_with_flex_decode_attention_gives_generate_s_text(tok, device):
    """``decode_attention=flex`` through the whole loop (on CUDA: captured graphs, flex_attention's
    Triton kernel compiled; on CPU its eager reference), fp32 greedy text equal to generate's."""
    m = tiny().to(device).eval()
    prompts = [chat(tok, p) for p in PROMPTS]
    ref = [Generator(m, tok, batch_size=1).generate([p], GREEDY)[0]["text"] for p in prompts]
    cb = ContinuousBatcher(
        m, tok, num_slots=3, max_prompt_tokens=128, max_new_tokens=32, fast_decode=True, decode_attention="flex"
    )
    assert cb.slots.attention == "flex", cb.slots.attention_note
    assert [r["text"] for r in cb.generate(prompts, GREEDY)] == ref
    assert cb.slots.graph_error is None and cb.slots.compile_error is None
    cb.close()
    if device == "cpu":  # the fast step is off on CPU unless asked for: a chosen attention says it is unused
        with pytest.warns(UserWarning, match="decode attention 'flex' is the fast decode step's, which is off"):
            ContinuousBatcher(
                m, tok, num_slots=1, max_prompt_tokens=16, max_new_tokens=4, decode_attention="flex"
            ).close()


def test_the_engine_with_the_fast_step_gives_generate_s_text(model, tok):
    prompts = [chat(tok, p) for p in PROMPTS]
    ref = [Generator(model, tok, batch_size=1).generate([p], GREEDY)[0]["text"] for p in prompts]
    cb = ContinuousBatcher(model, tok, num_slots=3, max_prompt_tokens=128, max_new_tokens=32, fast_decode=True)
    assert cb.slots.fast
    assert [r["text"] for r in cb.generate(prompts, GREEDY)] == ref


@pytest.mark.slow
@pytest.mark.parametrize("adapters", [False, True])
def test_the_compiled_decode_regions_equal_the_plain_functions(adapters, tiny_hf, tiny_adapters):
    """``torch.compile`` of the two per-layer functions (the graphs' path on CUDA; inductor's CPU
    backend here) gives the uncompiled functions' logits, with and without LoRA deltas in them, at
    every batch bucket, in the order start-up captures them (the largest first): the first
    compiles static, the others share one compilation with the rows symbolic (one row: its own)."""
    from torch._dynamo.utils import counters
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet

    m = AutoModelForCausalLM.from_pretrained(tiny_hf).eval() if adapters else tiny().eval()
    aset = AdapterSet(m, dict(tiny_adapters)) if adapters else None
    sm = SlotModel(m, num_slots=4, max_len=16, adapters=aset, fast=True)
    for slot, adapter in enumerate((2, 1, 0, 1) if adapters else (0, 0, 0, 0)):
        sm.set_adapter(slot, adapter)
    sm.prefill([[1, 5, 9, 400], [1, 7, 8], [1, 2], [1, 3, 4, 5, 6]], [0, 1, 2, 3])
    ids, pos = torch.tensor([31, 99, 7, 12]), torch.tensor([4, 3, 2, 5])
    torch._dynamo.reset()
    counters.clear()
    for rows in (4, 2, 1, 3):
        with torch.no_grad():
            plain = sm._decode(ids[:rows], pos[:rows], rows, 6, compiled=False)
            compiled = sm._decode(ids[:rows], pos[:rows], rows, 6, compiled=True)
        torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-4)
    assert counters["stats"]["unique_graphs"] == 2 * 3  # _pre and _post: 4 rows, n rows, 1 row


@pytest.mark.slow
def test_a_static_compilation_per_batch_bucket_is_not_cut_off_by_the_recompile_limit():
    """flex_attention compiles once per shape (a batch bucket each): past dynamo's default limit of
    8 a ``fullgraph`` function would fail (and the engine fall back to eager kernels)."""
    from cerbero_ray.inference.slots import _compiled

    def f(x):
        return (x * 3).sin()

    g = _compiled(f, False)
    for n in range(1, 12):
        torch.testing.assert_close(g(torch.ones(n)), f(torch.ones(n)))


def test_a_row_that_ends_while_the_next_step_is_in_flight_leaves_no_trace(model, tok):
    """The decode loop launches step n + 1 before it hands out step n's tokens, so a row that
    ends at a stop string in step n has already been decoded once more: that token is dropped, and
    the next request in its slot (one slot) starts clean, with generate's text."""
    prompts = [chat(tok, p) for p in PROMPTS[:3]]
    cb = ContinuousBatcher(model, tok, num_slots=1, max_prompt_tokens=128, max_new_tokens=32)
    full = cb.generate(prompts[:1], Sampling(max_new_tokens=24, temperature=0.0, stop=()))[0]
    stop = full["text"][6:9]
    s = Sampling(max_new_tokens=24, temperature=0.0, stop=(stop,))
    ref = [Generator(model, tok, batch_size=1).generate([p], GREEDY)[0] for p in prompts[1:]]
    got = cb.run([(prompts[0], s), (prompts[1], GREEDY), (prompts[2], GREEDY)])
    cut = got[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].index(stop)].strip()
    # the in-flight step's token is not counted: the tokens up to the stop string's end, no more
    assert cut["new_tokens"] < 24 and cb.steps > cut["new_tokens"]
    assert [(g["text"], g["new_tokens"]) for g in got[1:]] == [(r["text"], r["new_tokens"]) for r in ref]
    assert cb.live == {} and cb.pending is None and int(cb.slots.cur_pos.max()) == -1


def test_a_failed_admission_fails_its_requests_and_leaves_the_live_ones_running(model, tok, monkeypatch):
    cb = ContinuousBatcher(model, tok, num_slots=3, max_prompt_tokens=128, max_new_tokens=48)
    long = Sampling(max_new_tokens=40, temperature=0.0, stop=())
    want = cb.generate([chat(tok, PROMPTS[2])], long)[0]
    real = cb.slots.prefill
    bad = cb.encode([chat(tok, PROMPTS[4])])[0][0]
    failed = []

    def prefill(prompts, slots, starts=None):
        if any(len(p) > 8 and p == bad[len(bad) - len(p) :] for p in prompts):  # its rest after what a slot held
            failed.extend(slots)
            raise torch.OutOfMemoryError("CUDA out of memory (a test)")
        return real(prompts, slots, starts)

    monkeypatch.setattr(cb.slots, "prefill", prefill)
    it = cb.stream(chat(tok, PROMPTS[2]), long)
    first = next(it)  # live and decoding
    with pytest.raises(RuntimeError, match="admission failed: .*out of memory"):
        cb.generate([chat(tok, PROMPTS[4])], GREEDY)
    # the failed slot's cache is not offered to later prompts (its prefill may have written part of it)
    assert len(failed) == 1 and failed[0] not in cb.live and cb.prefixes.tokens(failed[0]) == []
    rest = list(it)
    assert (first + "".join(rest[:-1])).strip() == want["text"] and rest[-1]["new_tokens"] == 40
    after = cb.generate([chat(tok, PROMPTS[0])], GREEDY)[0]  # the failed one's slot is free again
    assert after["new_tokens"] >= 1 and cb.live == {}


def test_logprobs_and_seeds_through_the_in_flight_steps(model, tok):
    """Per-token logprobs (computed on the device with the step, read a step later) equal a plain
    forward's log-softmax of the chosen token; a seeded request draws once per token whatever
    else shares its steps, so its text and logprobs are its own."""
    prompt = chat(tok, PROMPTS[0])
    s = Sampling(max_new_tokens=8, temperature=0.8, top_p=0.9, seed=3, logprobs=2, stop=())
    cb = ContinuousBatcher(model, tok, num_slots=3, max_prompt_tokens=128, max_new_tokens=16)
    alone = cb.run([(prompt, s)])[0]
    crowd = cb.run([(prompt, s), (chat(tok, PROMPTS[1]), GREEDY), (chat(tok, PROMPTS[3]), s)])[0]
    assert crowd["text"] == alone["text"]
    assert [e["id"] for e in crowd["logprobs"]] == [e["id"] for e in alone["logprobs"]]
    (ids,), _ = cb.encode([prompt])
    toks = [e["id"] for e in alone["logprobs"]]
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids + toks])).logits[0].float(), -1)
    for j, e in enumerate(alone["logprobs"]):
        row = lp[len(ids) - 1 + j]
        assert e["logprob"] == pytest.approx(float(row[e["id"]]), abs=1e-4)
        assert [t for t, _ in e["top"]] == row.topk(2).indices.tolist()


def _penalized_reference(model, ids: list[int], s: Sampling, eos: int) -> list[int]:
    """Greedy decoding under the penalties and logit bias the slow way: the whole text through the
    model for every token; each candidate's logit divided (positive) or multiplied (negative) by the
    repetition penalty if the prompt or the answer holds it, less frequency x its count in the
    answer and presence if it is there, plus its bias."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(s.max_new_tokens):
            logits = model(torch.tensor([ids + out])).logits[0, -1].float()
            for t in set(ids + out):  # the repetition penalty first, over the prompt and the answer
                logits[t] = logits[t] / s.repetition_penalty if logits[t] > 0 else logits[t] * s.repetition_penalty
            for t in set(out):
                logits[t] -= s.frequency_penalty * out.count(t) + s.presence_penalty
            for t, b in (s.logit_bias or {}).items():
                logits[t] += b
            out.append(int(logits.argmax()))
            if out[-1] == eos:
                break
    return out


@pytest.mark.parametrize(
    "penalties",
    [(1.5, 0.5, False, 1.0), (-1.0, 0.0, False, 1.0), (0.0, 2.0, False, 1.0), (0.5, 0.0, True, 1.0)]
    + [(0.0, 0.0, False, 0.2), (0.5, 0.0, True, 3.0)],  # the repetition penalty, for repeating and against it
)
def test_penalties_give_the_reference_greedy_text_in_both_engines(model, tok, penalties):
    """Frequency and presence penalties and a logit bias (greedy, so every token can be checked):
    both engines give the reference loop's tokens, the continuous one beside plain rows that keep
    their own text; a seeded adjusted sample is the same alone or in a crowd."""
    f, p, biased, rep = penalties
    s = Sampling(max_new_tokens=20, temperature=0.0, stop=(), frequency_penalty=f, presence_penalty=p)
    s = replace(s, repetition_penalty=rep)
    prompts = [chat(tok, x) for x in PROMPTS[:3]]
    cb = ContinuousBatcher(model, tok, num_slots=4, max_prompt_tokens=128, max_new_tokens=32)
    ids, _ = cb.encode(prompts)
    if biased:  # the plain answers' first tokens banned, the first prompt's third one favoured
        firsts = [_penalized_reference(model, x, replace(GREEDY_20, max_new_tokens=3), -1) for x in ids]
        s = replace(s, logit_bias={**{a[0]: -100.0 for a in firsts}, firsts[0][2]: 3.0})
    want = [
        tok.decode(_penalized_reference(model, x, s, tok.eos_token_id), skip_special_tokens=True).strip() for x in ids
    ]
    neutral = replace(s, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, logit_bias=None)
    plain = [r["text"] for r in cb.run([(x, neutral) for x in prompts])]
    assert want != plain  # the penalties (the bias) change the answers of this model
    mixed = cb.run([(x, y) for x in prompts for y in (s, GREEDY_20)])
    assert [r["text"] for r in mixed[0::2]] == want
    assert [r["text"] for r in mixed[1::2]] == [r["text"] for r in cb.run([(x, GREEDY_20) for x in prompts])]
    assert [r["text"] for r in Generator(model, tok, batch_size=3).generate(prompts, s)] == want  # left-padded batch
    sampled = replace(s, temperature=0.9, top_p=0.95, seed=5)
    alone = cb.run([(prompts[0], sampled)])[0]["text"]
    assert cb.run([(prompts[0], sampled), (prompts[1], s), (prompts[2], GREEDY)])[0]["text"] == alone
    unadjusted = replace(sampled, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, logit_bias=None)
    assert alone != cb.run([(prompts[0], unadjusted)])[0]["text"]
    cb.close()


def test_the_hf_engine_s_repetition_penalty_leaves_the_left_padding_out():
    """transformers' own repetition processor reads the padding as prompt tokens; ours (``Adjust``)
    reads each row's prompt past its padding, and the answer's tokens past the padded width."""
    from cerbero_ray.inference.generator import Adjust

    s = Sampling(repetition_penalty=2.0, frequency_penalty=0.25)
    adjust = Adjust(4, s, pads=[2, 0])
    ids = torch.tensor([[0, 0, 5, 6, 9], [7, 8, 5, 6, 6]])  # pad 0; prompts [5, 6] and [7, 8, 5, 6]; answers 9, 6
    got = adjust(ids, torch.full((2, 10), 1.0))
    want = torch.ones(2, 10)
    want[0, [5, 6, 9]] = 0.5
    want[0, 9] -= 0.25  # generated once
    want[1, [5, 6, 7, 8]] = 0.5
    want[1, 6] -= 0.25
    torch.testing.assert_close(got, want)


def test_a_graph_captured_mid_answer_leaves_the_penalty_counts_as_they_were(model, tok, cpu_graphs):
    """A penalized answer that crosses into a length bucket not captured yet: the capture's warm-up
    runs (which advance the device state) are undone, its token counts included, so the text is
    the eager engine's (the CPU stand-in for CUDA graphs runs the capture's body as a GPU does)."""
    prompt = chat(tok, "Scrivi una frase sul mare, " * 12)
    s = Sampling(max_new_tokens=40, temperature=0.0, stop=(), frequency_penalty=1.5, presence_penalty=0.5)
    kw = dict(num_slots=2, max_prompt_tokens=128, max_new_tokens=40)
    eager = ContinuousBatcher(model, tok, **kw)
    (ids,), _ = eager.encode([prompt])
    assert 100 < len(ids) < 128  # the answer crosses from the 128 bucket into the 168 one
    want = eager.run([(prompt, s)])[0]
    cb = cpu_graphs(ContinuousBatcher(model, tok, **kw))
    assert {k[0] for k in cb.slots.step_graphs} == {128}
    got = cb.run([(prompt, s)])[0]
    assert {k[0] for k in cb.slots.step_graphs} == {128, 168} and got["new_tokens"] == want["new_tokens"] == 40
    assert got["text"] == want["text"]
    eager.close()
    cb.close()


def test_a_graph_that_runs_out_of_memory_at_capture_is_that_shape_s_alone(model, tok, cpu_graphs, monkeypatch):
    """The largest batch bucket's capture runs out of memory (a full card): its steps decode
    eagerly, every other bucket keeps its graph, compilation stays on, the engine says so, and the
    texts are the eager engine's."""
    from conftest import _Replayed

    def capture(self, body, compiled):  # the CPU stand-in, short of memory for 4 rows
        out = body(compiled)
        if (out if isinstance(out, torch.Tensor) else out[0]).shape[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return _Replayed(body, out), out

    kw = dict(num_slots=4, max_prompt_tokens=128, max_new_tokens=12)
    items = [
        (chat(tok, p), Sampling(max_new_tokens=12 - i, temperature=0.0, stop=()), 0) for i, p in enumerate(PROMPTS[:4])
    ]
    want = [ContinuousBatcher(model, tok, **kw).run([it])[0] for it in items]
    cb = cpu_graphs(ContinuousBatcher(model, tok, **kw))
    monkeypatch.setattr(SlotModel, "_capture_once", capture)
    with pytest.warns(UserWarning, match=r"capture of \(\d+, 4, (True|False)\) ran out of memory: that shape decodes"):
        cb.slots.step_graphs.clear()
        cb.slots.warm()
    sm = cb.slots
    assert sm.graph_error is None and {k[1] for k, g in sm.step_graphs.items() if g is None} == {4}
    assert {k[1] for k, g in sm.step_graphs.items() if g is not None} == {1, 2}
    assert "no graph (out of memory at capture) for batch sizes [4]" in cb.describe()
    got = cb.run(items)
    assert [(r["text"], r["new_tokens"]) for r in got] == [(r["text"], r["new_tokens"]) for r in want]
    replayed = {k[1] for k, g in sm.step_graphs.items() if g is not None and g[0].replays}
    assert replayed == {1, 2}  # the rows fell from 4 to 1 as answers ended: the small buckets replayed
    cb.close()


def test_closing_the_engine_stops_its_loop_and_fails_what_it_held(model, tok):
    cb = ContinuousBatcher(model, tok, num_slots=1, max_prompt_tokens=128, max_new_tokens=64)
    it = cb.stream(chat(tok, PROMPTS[1]), Sampling(max_new_tokens=64, temperature=0.0, stop=()))
    next(it)
    cb.close()
    assert not cb._thread.is_alive()
    with pytest.raises(RuntimeError, match="engine was closed"):
        list(it)
    with pytest.raises(RuntimeError, match="engine is closed"):
        cb.generate([chat(tok, PROMPTS[0])], GREEDY)
    # nothing else holds a closed engine: dropped, it and its KV cache are freed
    import gc
    import weakref

    gone, cache = weakref.ref(cb), weakref.ref(cb.slots.k)
    del cb, it
    gc.collect()
    assert gone() is None and cache() is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("window", [None, 6])
def test_chunked_prefill_gives_the_whole_prompt_s_logits(window, device):
    """Prompts prefilled in chunks (each continuing its slot's cache, rows at different offsets),
    packed in one batch with whole prompts of other lengths that join mid-way, give the logits of
    each prompt prefilled alone and of the HF forward, the same cache, and decoding goes on alike
    (fp32; on CUDA the same inputs through the GPU's attention kernels)."""
    m = tiny(overrides={"sliding_window": window}).to(device).eval()
    tol = dict(rtol=1e-4, atol=1e-4) if device == "cpu" else dict(rtol=2e-3, atol=2e-3)
    seqs = [
        [1, 5, 9, 400, 31, 7, 8, 99, 12, 13, 14, 15, 16],
        [1, 100, 200, 300, 301, 302],
        [1, 42, 43, 44, 45, 46, 47, 48],
        [1, 77, 78, 79, 80, 81, 82, 83, 84],  # whole, beside step 1's continuing chunks
        [1, 60],  # whole, beside step 2's (another padding group than the 9 tokens above)
    ]
    n = len(seqs)
    alone, chunked = SlotModel(m, num_slots=n, max_len=32), SlotModel(m, num_slots=n, max_len=32)
    want = [alone.prefill([s], [i])[0] for i, s in enumerate(seqs)]
    # each step's chunks (row, start, end): whole prompts and continuing chunks mixed
    steps = [
        [(0, 0, 5), (1, 0, 2), (2, 0, 3)],
        [(0, 5, 9), (3, 0, 9), (1, 2, 6), (2, 3, 4)],
        [(2, 4, 8), (4, 0, 2), (0, 9, 13)],
    ]
    got = {}
    for batch in steps:
        out = chunked.prefill([seqs[i][a:b] for i, a, b in batch], [i for i, _, _ in batch], [a for _, a, _ in batch])
        for j, (i, _, b) in enumerate(batch):
            if b == len(seqs[i]):
                got[i] = out[j]
    with torch.no_grad():
        ref = [m(torch.tensor([s], device=device)).logits[0, -1] for s in seqs]
    for i in range(n):
        torch.testing.assert_close(got[i], want[i], **tol)
        torch.testing.assert_close(got[i], ref[i], **tol)
        for cache in ("k", "v"):  # every written position, the same keys and values
            a, b = getattr(chunked, cache)[:, i, : len(seqs[i])], getattr(alone, cache)[:, i, : len(seqs[i])]
            torch.testing.assert_close(a, b, **tol)
    ids, pos = torch.arange(17, 17 + n), torch.tensor([len(s) for s in seqs])
    torch.testing.assert_close(chunked.decode(ids, pos), alone.decode(ids, pos), **tol)


def test_packed_prefill_groups_bound_the_padding():
    """Whole prompts' attention groups: every prompt in one group, longest first, and a group's
    padded size (rows × its longest) within 1.25× its tokens unless it is one prompt."""
    from cerbero_ray.inference.slots import _prefill_groups

    rng = np.random.default_rng(0)
    for _ in range(50):
        lens = rng.integers(1, 300, size=rng.integers(1, 40)).tolist()
        segs = list(zip(np.cumsum([0] + lens[:-1]).tolist(), lens))
        groups = _prefill_groups(segs)
        assert sorted(x for g in groups for x in g) == sorted(segs)
        for g in groups:
            assert [x[1] for x in g] == sorted((x[1] for x in g), reverse=True)
            assert len(g) == 1 or len(g) * g[0][1] <= 1.25 * sum(x[1] for x in g)
    assert len(_prefill_groups([(0, 7), (7, 7), (14, 7)])) == 1  # one length: one batch


def test_the_longest_held_prefix_under_the_request_s_adapter():
    pairs = (([], [1]), ([1, 2, 3], [1, 2, 3]), ([1, 2, 3], [1, 2]), ([5], [6]))
    assert [common_prefix(a, b) for a, b in pairs] == [0, 3, 2, 0]
    g = np.random.default_rng(0)
    for _ in range(200):  # against a plain loop
        a, b = g.integers(0, 3, g.integers(0, 12)).tolist(), g.integers(0, 3, g.integers(0, 12)).tolist()
        assert common_prefix(a, b) == next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    p = SlotPrefixes(4)
    p.set(0, 0, [1, 2, 3])
    p.set(1, 1, [1, 2, 3, 4, 5])  # another adapter's
    p.set(2, 0, [1, 2, 3, 4])
    p.set(3, 0, [1, 2, 3, 4])  # as long as slot 2's: the lower slot wins
    assert p.best([1, 2, 3, 4, 5, 6], 0, 10) == (2, 4)
    assert p.best([1, 2, 3, 4, 5, 6], 0, 2) == (0, 2)  # at most the limit
    assert p.best([1, 2, 3, 4, 5, 6], 1, 10) == (1, 5) and p.best([9], 0, 10) == (-1, 0)
    assert p.best([1, 2, 3, 4, 5, 6], 0, 10, {3: (0, [1, 2, 3, 4, 5])}) == (3, 5)  # other records
    p.set(2, 0, [])
    p.drop(3)
    assert p.tokens(2) == [] and p.best([1, 2, 3, 4], 0, 10) == (0, 3)
    p.clear()
    assert p.best([1, 2, 3], 0, 10) == (-1, 0)


def test_what_no_other_slot_holds_is_counted_as_records_change():
    """``SlotPrefixes.unique``: a slot's tokens past the whole 16-token blocks another record under
    the same key starts with too, against a brute-force count, through random sets, overwrites,
    drops and a clear (records sharing a system prompt, chats extending earlier turns, another key)."""
    import random

    g = random.Random(0)
    p, size = SlotPrefixes(12), SlotPrefixes.BLOCK
    system = [g.randrange(50) for _ in range(70)]
    for it in range(400):
        slot = g.randrange(12)
        op = g.random()
        if op < 0.05:
            p.drop(slot)
        elif op < 0.07:
            p.clear()
        else:
            other = p.tokens(g.randrange(12))
            base = other if other and g.random() < 0.5 else system[: g.randrange(0, 70)]
            p.set(
                slot,
                g.randrange(2),
                base[: g.randrange(len(base) + 1)] + [g.randrange(50) for _ in range(g.randrange(40))],
            )
        for s in range(12):
            rec = p.held[s]
            if rec is None:
                assert p.unique(s) == 0
                continue
            shared = max(
                (
                    common_prefix(rec[1], h[1])
                    for t, h in enumerate(p.held)
                    if t != s and h is not None and h[0] == rec[0]
                ),
                default=0,
            )
            assert p.unique(s) == len(rec[1]) - shared // size * size, (it, s)


@pytest.mark.parametrize("device", DEVICES)
def test_prompts_that_start_alike_reuse_what_the_slots_hold_and_get_the_same_text(model, tok, device):
    """Prefix reuse: four chats with one long system prompt, sent at once: the first is computed,
    the others wait one step and copy its shared part; sent again (another order), each finds
    its own earlier prompt; a chat's next turn reuses its previous prompt (and answer). Every text
    equals an engine without reuse, and only the tokens not reused are computed (on CUDA: with
    the graphs and the fast step, fp32)."""
    model = model if device == "cpu" else tiny().to(device).eval()
    system = "Sei un assistente che risponde sempre in italiano, in modo breve, chiaro e cortese. " * 4
    questions = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[4]]

    def render(*turns):
        msgs = [{"role": "system", "content": system}]
        msgs += [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]
        return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    prompts = [render(q) for q in questions]
    ids, _ = encode_prompts(tok, prompts, 256)
    shared = min(common_prefix(ids[0], x) for x in ids[1:])
    assert shared > 64  # the system prompt, whole
    kw = dict(num_slots=4, max_prompt_tokens=256, max_new_tokens=24)
    plain = ContinuousBatcher(model, tok, prefix_cache=False, **kw)
    cb = ContinuousBatcher(model, tok, **kw)
    assert "; prefix reuse" in cb.describe() and "no prefix reuse" in plain.describe()
    computed = counting_prefill(cb)
    for order in (questions, questions[::-1]):
        batch = [render(q) for q in order]
        want, got = plain.generate(batch, GREEDY_20), cb.generate(batch, GREEDY_20)
        assert [g["text"] for g in got] == [w["text"] for w in want]
        assert [g["prompt_tokens"] for g in got] == [w["prompt_tokens"] for w in want]
        assert all(w["cached_tokens"] == 0 for w in want)
        n = [g["prompt_tokens"] for g in got]
        cached = [g["cached_tokens"] for g in got]
        if order is questions:
            assert cached == [0] + [common_prefix(ids[0], x) for x in ids[1:]]
        else:  # each one's own slot: the whole prompt but its last token, whose logits start the answer
            assert cached == [k - 1 for k in n]
        assert sum(computed) == sum(n) - sum(cached)
        computed.clear()
    # the next turn: the first chat's prompt and answer, then a new question
    first = want[-1]  # questions[0], the last of the reversed order
    turn = render(questions[0], first["text"], "E poi?")
    again = cb.generate([turn], GREEDY_20)[0]
    assert again["text"] == plain.generate([turn], GREEDY_20)[0]["text"]
    assert again["cached_tokens"] >= common_prefix(ids[0], encode_prompts(tok, [turn], 256)[0][0]) >= len(ids[0]) - 1
    assert sum(computed) == again["prompt_tokens"] - again["cached_tokens"]
    plain.close()
    cb.close()


@pytest.mark.parametrize("num_slots", [4, 2])
def test_a_request_that_waits_for_a_shared_prefix_keeps_a_slot_and_holds_no_one_else_back(model, tok, num_slots):
    """A burst of two chats with one long system prompt and an unrelated chat behind them: the
    second chat waits a step for the first's system prompt; with slots to spare the unrelated one
    is prefilled beside the first, not a step later; with one spare slot that slot is kept for the
    waiting chat, which goes first. Texts equal an engine without reuse."""
    system = "Sei un assistente che risponde sempre in italiano, in modo breve, chiaro e cortese. " * 4
    with_system = lambda q: tok.apply_chat_template(  # noqa: E731
        [{"role": "system", "content": system}, {"role": "user", "content": q}],
        tokenize=False,
        add_generation_prompt=True,
    )
    prompts = [with_system(PROMPTS[1]), with_system(PROMPTS[2]), chat(tok, PROMPTS[3])]
    (a, b, c), _ = encode_prompts(tok, prompts, 256)
    shared = common_prefix(a, b)
    assert shared > 64 and common_prefix(a, c) < 8
    kw = dict(num_slots=num_slots, max_prompt_tokens=256, max_new_tokens=24)
    plain, cb = ContinuousBatcher(model, tok, prefix_cache=False, **kw), ContinuousBatcher(model, tok, **kw)
    steps, real = [], cb.slots.prefill
    cb.slots.prefill = lambda p, s, st=None: steps.append([len(x) for x in p]) or real(p, s, st)
    want, got = plain.generate(prompts, GREEDY_20), cb.generate(prompts, GREEDY_20)
    assert [g["text"] for g in got] == [w["text"] for w in want]
    assert [g["cached_tokens"] for g in got] == [0, shared, 0]
    if num_slots == 4:
        assert steps == [[len(a), len(c)], [len(b) - shared]]
    else:  # the one free slot beside the first chat is the waiting chat's; the unrelated one waits for a free slot
        assert steps == [[len(a)], [len(b) - shared], [len(c)]]
    plain.close()
    cb.close()


def test_the_host_store_keeps_the_most_recent_prefixes_within_its_pages():
    import random

    from cerbero_ray.inference.prefix import HostPrefixes, covers

    st = HostPrefixes(pages=6, page_tokens=16, block=8)  # 96 tokens, in pages of 16, found by blocks of 8
    a = list(range(100, 148))
    assert st.add("a", a[:40]) == [0, 1, 2]  # 3 pages
    assert st.add("b", a[:20]) == [3, 4]  # another key: both kept
    assert st.add("a", a[:48]) == [0, 1, 2]  # extends the first under its key: replaces it
    assert [(e[0], len(e[1])) for e in st.entries.values()] == [("b", 20), ("a", 48)] and st.used == 5
    with pytest.raises(ValueError, match="a block at least"):
        st.add("a", a[:7])
    # found through whole pages, then compared token by token; never across keys
    assert st.find(a[:30] + [7, 7, 7], "a", 100) == (2, 30) and st.find(a, "a", 41) == (2, 41)
    assert st.find(a[:7] + [1] * 30, "a", 100) == (-1, 0)  # not one whole block shared
    assert st.find(a[:9] + [1] * 30, "a", 100) == (2, 9)
    assert st.find(a, "c", 100) == (-1, 0) and st.find(a, "b", 100) == (1, 20)
    assert st.holds("a", a[:45]) and st.holds("b", a[:17]) and not st.holds("b", a[:21])
    assert not st.holds("a", a[:7]) and st.holds("a", a[:8]) and not st.holds("c", a[:20])
    assert not covers([("a", [0, 1])], "a", [0, 1, 2]) and not covers([None, ("a", [0, 2])], "a", [0, 1])
    assert covers([("a", [0, 1, 2])], "a", [0, 1])
    assert st.take(1) == [3, 4] and st.hits == 1  # now the most recently used
    assert st.add("c", a[:30]) == [0, 1]  # 2 pages, 1 free: the least recently used ("a") goes
    assert [e[0] for e in st.entries.values()] == ["b", "c"] and st.used == 4
    assert st.find(a, "a", 100) == (-1, 0) and not st.holds("a", a[:20])  # and its index with it
    assert not st.fits(97) and st.fits(96)
    # an entry being copied back is never dropped to make room for the one copied out beside it
    assert list(st.entries) == [1, 3]  # "b" the least recently used
    assert len(st.add("d", a, keep=1)) == 3 and list(st.entries) == [1, 4]  # "c" went, not "b"
    assert st.add("e", a + a[:32], keep=1) is None and list(st.entries) == [1, 4]  # 5 pages: no room beside "b"
    st.clear()
    assert st.entries == {} and st.index == {} and st.used == 0 and sorted(st.free) == list(range(6))
    # against a brute-force search over many entries sharing their first pages (a system prompt)
    g = random.Random(0)
    big = HostPrefixes(pages=4000, page_tokens=16, block=4)
    system = [g.randrange(50) for _ in range(40)]
    for _ in range(300):
        big.add(0, system + [g.randrange(3) for _ in range(g.randrange(0, 60))])
    for _ in range(200):
        ids = system + [g.randrange(3) for _ in range(g.randrange(0, 70))]
        limit = g.randrange(1, len(ids) + 1)
        want = max(min(common_prefix(e[1], ids), limit) for e in big.entries.values())
        got = big.find(ids, 0, limit)
        assert got[1] == (want if want >= 4 else 0), (ids, limit)
        assert got[0] == -1 or min(common_prefix(big.entries[got[0]][1], ids), limit) == got[1]
        assert big.holds(0, ids) == any(e[1][: len(ids)] == ids for e in big.entries.values())


@pytest.mark.parametrize("device", DEVICES)
def test_a_chat_whose_slot_was_taken_gets_its_prefix_back_from_the_host_store(model, tok, device):
    """Four chats on two slots, turn after turn: between a chat's turns the others take its slot.
    With slots alone most turns find nothing; with a host store each turn copies its conversation
    back (saved when its slot was taken) and prefills only the new tokens. Every text equals an
    engine without reuse (so what came back is the keys and values themselves); a prefix that
    another slot or entry still holds is not saved twice; forget() empties the store too (on CUDA:
    pinned memory, asynchronous copies both ways, the graphs)."""
    model = model if device == "cpu" else tiny().to(device).eval()
    kw = dict(num_slots=2, max_prompt_tokens=256, max_new_tokens=24)
    plain = ContinuousBatcher(model, tok, prefix_cache=False, **kw)
    slots_only = ContinuousBatcher(model, tok, **kw)
    cb = ContinuousBatcher(model, tok, prefix_store_bytes=2**24, **kw)
    computed = counting_prefill(cb)
    convs = [[{"role": "user", "content": q}] for q in (PROMPTS[1], PROMPTS[2], PROMPTS[3], PROMPTS[4])]
    cached, before = {"slots": [], "store": []}, []
    for turn in range(3):
        prompts = [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in convs]
        want = plain.generate(prompts, GREEDY_20)
        got, alone = cb.generate(prompts, GREEDY_20), slots_only.generate(prompts, GREEDY_20)
        assert [g["text"] for g in got] == [w["text"] for w in want] == [a["text"] for a in alone]
        assert sum(computed) == sum(g["prompt_tokens"] - g["cached_tokens"] for g in got)
        computed.clear()
        if turn:
            ids, _ = encode_prompts(tok, prompts, 256)
            # each turn starts with the conversation's previous prompt: with the store that much at
            # least came back; with slots alone most turns found less (others had taken the slot)
            prev = [common_prefix(p, x) for p, x in zip(before, ids)]
            assert all(g["cached_tokens"] >= n for g, n in zip(got, prev))
            cached["slots"] += [a["cached_tokens"] < n for a, n in zip(alone, prev)]
            cached["store"] += [g["cached_tokens"] for g in got]
            cached["alone"] = cached.get("alone", 0) + sum(a["cached_tokens"] for a in alone)
        before, _ = encode_prompts(tok, prompts, 256)
        for c, w in zip(convs, want):
            c += [{"role": "assistant", "content": w["text"] or "..."}, {"role": "user", "content": "E poi?"}]
    assert sum(cached["slots"]) >= 4 and sum(cached["store"]) > 2 * cached["alone"]
    assert cb.store.hits == 8 and cb.store.saved >= 8
    pages = [p for e in cb.store.entries.values() for p in e[2]]
    assert len(set(pages)) == len(pages) == cb.store.used > 0 and not set(pages) & set(cb.store.free)
    for i, e in enumerate(cb.store.entries.values()):  # nothing saved twice: no entry covers another
        others = [(f[0], f[1]) for j, f in enumerate(cb.store.entries.values()) if j != i]
        assert not any(o[1][: len(e[1])] == e[1] for o in others)
    cb.forget()
    assert cb.store.entries == {} and cb.store.used == 0
    for engine in (plain, slots_only, cb):
        engine.close()


def _assert_slots_hold(cb, model, held: list[list[int]], max_len: int) -> None:
    """Each slot's cache holds, for the tokens ``held[slot]``, what a fresh prefill of them writes."""
    for slot, tokens in enumerate(held):
        ref = SlotModel(model, num_slots=1, max_len=max_len)
        ref.prefill([tokens], [0])
        for got, want in ((cb.slots.k, ref.k), (cb.slots.v, ref.v)):
            torch.testing.assert_close(got[:, slot, : len(tokens)], want[:, 0, : len(tokens)], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_at_light_load_the_idle_slots_keep_the_chats_their_turns_come_back_to(model, tok, device):
    """One request at a time on four slots (a light load): two chats, one-off questions between
    their turns. Each request decodes in slot 0 (the live rows stay packed), and what slot 0 held
    moves to an idle slot (the least recently used prefix goes first) instead of being lost, so each
    chat's next turn finds its conversation (before: the one-off questions had overwritten it, and
    slots 1 to 3 were never used). Every text equals an engine without reuse, and every slot's cache
    is what a fresh prefill of the tokens it says it holds writes."""
    model = model if device == "cpu" else tiny().to(device).eval()
    kw = dict(num_slots=4, max_prompt_tokens=256, max_new_tokens=24)
    plain = ContinuousBatcher(model, tok, prefix_cache=False, **kw)
    cb = ContinuousBatcher(model, tok, **kw)
    rows = set()
    cb.on_step = lambda: rows.update(cb.live)
    convs = {c: [{"role": "user", "content": PROMPTS[i]}] for c, i in (("a", 1), ("b", 3))}
    first = {}
    for turn in range(2):
        for c, other in (("a", PROMPTS[2]), ("b", PROMPTS[4])):
            for msgs in (convs[c], [{"role": "user", "content": f"{other} ({turn})"}]):
                prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                got, want = cb.generate([prompt], GREEDY_20)[0], plain.generate([prompt], GREEDY_20)[0]
                assert got["text"] == want["text"]
                if msgs is convs[c]:
                    answer = want["text"]
                    ids = encode_prompts(tok, [prompt], 256)[0][0]
                    if turn:  # the conversation so far: its first prompt and answer at least
                        assert got["cached_tokens"] >= common_prefix(first[c], ids) >= len(first[c]) - 1
                    first[c] = ids
            convs[c] += [{"role": "assistant", "content": answer or "..."}, {"role": "user", "content": "E poi?"}]
    assert rows == {0}
    held = [cb.prefixes.tokens(s) for s in range(4)]
    assert all(held)
    _assert_slots_hold(cb, model, held, max_len=256)
    cb.park = False  # the old choice: each request in the lowest free slot, over what it held
    cb.forget()
    prompts = [
        tok.apply_chat_template(m, tokenize=False, add_generation_prompt=True)
        for m in (convs["a"][:1], [{"role": "user", "content": PROMPTS[2]}], convs["a"][:3])
    ]
    last = [cb.generate([p], GREEDY_20)[0] for p in prompts][-1]
    ids = encode_prompts(tok, prompts, 256)[0]
    # what the one-off question shares with it (the chat template's start), not its first turn
    assert last["cached_tokens"] == common_prefix(ids[1], ids[2]) < common_prefix(ids[0], ids[2]) - 1
    plain.close()
    cb.close()


def test_a_prefix_is_reused_only_where_it_saves_arithmetic(model, tok):
    """A continuing chunk's attention computes every query-key pair (a mask over the slot's cache)
    where a whole prompt's causal kernel skips half: on the tiny model, whose layers are small beside
    its attention, a short shared beginning before a long rest is computed with the rest, a long one
    is reused; on a 7B's layers a few dozen tokens pay."""
    import random

    from cerbero_ray.models import mistral_7b_config

    g = random.Random(0)
    words = lambda n: [g.randrange(100, 30000) for _ in range(n)]  # noqa: E731
    shared, a, b = words(40), words(800), words(800)
    cb = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=900, max_new_tokens=4, prefill_tokens=4096)
    s = Sampling(max_new_tokens=2, temperature=0.0, stop=())
    assert _ask(cb, shared + a, s)["cached_tokens"] == 0
    assert _ask(cb, shared + a[:600] + words(100), s)["cached_tokens"] == 640  # 640 of 740: reused
    assert _ask(cb, shared + b, s)["cached_tokens"] == 0  # 40 of 840: computed whole
    assert not cb._pays(35, 1425) and cb._pays(600, 1425) and not cb._pays(0, 100)
    c = mistral_7b_config()  # a 7B's layer: 2 x its parameters a token, against 4 x heads x head dim a pair
    hd = c.hidden_size // c.num_attention_heads
    attention = 2 * c.hidden_size * hd * (c.num_attention_heads + c.num_key_value_heads)  # q, k, v, o
    layer = attention + 3 * c.hidden_size * c.intermediate_size  # and the MLP
    cb._per_token, cb._per_pair = 2 * layer, 4 * c.num_attention_heads * hd
    assert cb._pays(40, 1425) and not cb._pays(30, 1425)
    cb.close()


def _ask(cb, ids, s) -> dict:
    import queue

    q = queue.Queue()
    cb.submit(ids, s, q.put)
    while not isinstance(item := q.get(timeout=60), dict):
        pass
    return item


def test_a_salted_request_shares_cached_prefixes_only_with_its_own_salt(model, tok):
    """vLLM's ``cache_salt``: a tenant's requests reuse each other's prefixes and no one else's (so
    the time to first token tells no one what another tenant sent); the text is the same."""
    import asyncio

    cb = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=64, max_new_tokens=16)
    prompt = chat(tok, PROMPTS[1])
    ids = cb.encode([prompt])[0][0]

    async def ask(salt):
        return await cb.agenerate(prompt, GREEDY, ids, 0, salt)

    got = [asyncio.run(ask(salt)) for salt in (None, "a", "a", "b", None, None)]
    assert len({g["text"] for g in got}) == 1
    # one slot decodes (slot 0), the other keeps what slot 0 held before (the least recently used
    # goes): when the fifth comes, the two slots hold "a"'s and "b"'s, not the unsalted first's
    assert [g["cached_tokens"] for g in got] == [0, 0, len(ids) - 1, 0, 0, len(ids) - 1]
    cb.forget()  # what a batch job does per chunk: nothing is reused from before
    assert asyncio.run(ask(None))["cached_tokens"] == 0
    cb.close()


def test_what_a_slot_says_it_holds_is_what_its_cache_holds(model, tok):
    """After requests that end at their token limit, at a stop string and by a client that leaves,
    each slot's record (the prompt and the answer but its last token) is exactly what a fresh
    prefill of those tokens writes: nothing reused is stale or never written."""
    import queue

    cb = ContinuousBatcher(model, tok, num_slots=3, max_prompt_tokens=64, max_new_tokens=24)
    limit = Sampling(max_new_tokens=10, temperature=0.0, stop=())
    free = cb.generate([chat(tok, PROMPTS[1])], GREEDY_20)[0]["text"]
    stop = Sampling(max_new_tokens=20, temperature=0.0, stop=(free[6:9],))
    qs = [queue.Queue() for _ in range(3)]
    with cb.lock:  # the three share the steps: one slot each
        rs = [
            cb.submit(cb.encode([chat(tok, p)])[0][0], s, q.put)
            for p, s, q in zip(PROMPTS, (limit, stop, GREEDY_20), qs)
        ]
    ended = []
    for q in qs[:2]:
        while not isinstance(item := q.get(timeout=60), dict):
            pass
        ended.append(item)
    assert [e["finish_reason"] for e in ended] == ["length", "stop"] and ended[1]["new_tokens"] < 20
    cb.cancel(rs[2])  # a client that leaves mid-answer
    deadline = time.time() + 10
    while cb.live and time.time() < deadline:
        time.sleep(0.01)
    held = [cb.prefixes.tokens(s) for s in range(3)]
    assert all(held) and cb.live == {}
    assert len(held[rs[0].slot]) == ended[0]["prompt_tokens"] + 10 - 1  # the token limit's last token was never fed
    _assert_slots_hold(cb, model, held, max_len=80)
    cb.close()


def test_a_slot_s_cache_is_reused_only_under_the_adapter_that_wrote_it(tiny_hf, tiny_adapters, tok):
    """Keys and values depend on the LoRA adapter: the same prompt under another adapter is
    computed anew (and its text is that adapter's), under the same adapter it is reused."""
    from transformers import AutoModelForCausalLM

    from cerbero_ray.inference.multilora import AdapterSet

    served = AutoModelForCausalLM.from_pretrained(tiny_hf).eval()
    aset = AdapterSet(served, dict(tiny_adapters), "cerbero")
    kw = dict(num_slots=2, max_prompt_tokens=64, max_new_tokens=16, adapters=aset)
    cb, plain = ContinuousBatcher(served, tok, **kw), ContinuousBatcher(served, tok, prefix_cache=False, **kw)
    prompt = chat(tok, PROMPTS[1])
    n = len(cb.encode([prompt])[0][0])
    got = [cb.run([(prompt, GREEDY, a)])[0] for a in (1, 2, 2, 0, 1)]
    want = [plain.run([(prompt, GREEDY, a)])[0] for a in (1, 2, 2, 0, 1)]
    assert [g["text"] for g in got] == [w["text"] for w in want]
    assert len({w["text"] for w in want[:4]}) == 3  # the adapters do change the text
    # two slots: adapter 2's second request finds its first; the base finds nothing of its own;
    # adapter 1's prefix was the least recently used of the two kept by then
    assert [g["cached_tokens"] for g in got] == [0, 0, n - 1, 0, 0]
    cb.close()
    plain.close()


def test_the_prefill_budget_counts_prompt_tokens_not_padding(model, tok):
    """Prompts of very different lengths are admitted in one packed step when their tokens fit
    ``prefill_tokens`` (rows × longest would not), never more than that in a step, and the text
    equals an engine that admits them one a step."""
    lens = []
    prompts = [chat(tok, p) for p in (PROMPTS[3], PROMPTS[0], PROMPTS[4])]
    ids, _ = encode_prompts(tok, prompts, 128)
    budget = sum(len(x) for x in ids)
    assert 3 * max(len(x) for x in ids) > budget  # the padded rule would have split them
    one = ContinuousBatcher(
        model, tok, num_slots=3, max_prompt_tokens=128, max_new_tokens=16, prefill_tokens=len(ids[0])
    )
    want = [one.run([(p, GREEDY)])[0]["text"] for p in prompts]
    for limit in (budget, budget - 1):
        cb = ContinuousBatcher(model, tok, num_slots=3, max_prompt_tokens=128, max_new_tokens=16, prefill_tokens=limit)
        real, lens = cb.slots.prefill, []
        cb.slots.prefill = lambda p, s, a=None, real=real, lens=lens: lens.append([len(x) for x in p]) or real(p, s, a)
        got = [None] * 3

        def one(i, cb=cb, got=got):
            got[i] = cb.run([(prompts[i], GREEDY)])[0]

        with cb.lock:  # the loop waits: all three are queued before the first step
            threads = [threading.Thread(target=one, args=(i,)) for i in range(3)]
            for t in threads:
                t.start()
            while len(cb.waiting) < 3:
                time.sleep(0.001)
        for t in threads:
            t.join(60)
        assert [g["text"] for g in got] == want
        assert all(sum(x) <= limit for x in lens)
        assert (len(lens[0]) == 3) == (limit == budget), lens


def test_a_long_prompt_is_prefilled_a_chunk_a_step_while_the_others_decode(model, tok):
    """``prefill_tokens`` bounds each step's padded prefill: a prompt longer than it is prefilled
    over several steps, a live stream getting tokens in between, and the text equals an unchunked
    engine's."""
    short = tok("Ciao, come stai?", add_special_tokens=True).input_ids
    long = tok("Scrivi una frase sul mare e sul vento di maestrale " * 5, add_special_tokens=True).input_ids
    assert len(long) > 64
    s = Sampling(max_new_tokens=24, temperature=0.0, stop=())
    whole = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=128, max_new_tokens=32)
    want = []
    for x in (short, long):
        q = __import__("queue").Queue()
        whole.submit(x, s, lambda item, q=q: q.put(item) if isinstance(item, dict) else None)
        want.append(q.get(timeout=60))
    cb = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=128, max_new_tokens=32, prefill_tokens=16)
    events, done = [], [threading.Event(), threading.Event()]
    results = [None, None]

    def emit(i):
        def f(item):
            events.append((i, cb.steps))
            if isinstance(item, dict):
                results[i] = item
                done[i].set()

        return f

    cb.submit(short, s, emit(0))
    while not events:
        time.sleep(0.001)
    cb.submit(long, s, emit(1))
    assert done[0].wait(60) and done[1].wait(60)
    first_long = min(step for i, step in events if i == 1)
    during = {step for i, step in events if i == 0 and step < first_long}
    assert len(during) >= 3  # the stream went on while the long prompt's chunks ran
    assert [r["text"] for r in results] == [w["text"] for w in want]
    assert results[1]["prompt_tokens"] == len(long) and cb.live == {} and not cb.prefilling


@pytest.mark.parametrize("window", [None, 7])
def test_random_arrivals_budgets_and_cancels_give_each_request_its_own_result(window, tok, cpu_graphs):
    """A randomized mix (prompts of 1 to 96 tokens, greedy and seeded sampled requests, some with
    frequency and presence penalties, arrivals at
    random moments from many threads, two clients that leave after their first piece) through engines
    of 2 to 5 slots, prefill budgets smaller than a prompt up to larger than all of them, with the
    fast step or the module path, eager or through captured batch buckets (the CPU stand-in for
    CUDA graphs), two of them with a host prefix store: every request that stays gets what it gets
    alone in a one-slot engine, and the engine ends with no slot held."""
    import queue
    import random

    model = (tiny(overrides={"sliding_window": window}) if window else tiny()).eval()
    g = random.Random(window or 0)
    n = 12
    lengths = [g.choice([1, 2, g.randrange(1, 96), g.randrange(40, 96)]) for _ in range(n)]
    prompts = [[g.randrange(100, 30000) for _ in range(k)] for k in lengths]
    share = random.Random(100 + (window or 0))  # half of them start as an earlier one (prefix reuse)
    for i in range(1, n):
        if share.random() < 0.5:
            base = prompts[share.randrange(i)]
            keep = share.randrange(min(len(base), lengths[i]) + 1)
            prompts[i] = base[:keep] + prompts[i][keep:]
    samplings = [
        Sampling(max_new_tokens=g.randrange(1, 12), temperature=0.0, stop=())
        if i % 2
        else Sampling(max_new_tokens=g.randrange(1, 12), temperature=0.9, top_p=0.8, stop=(), seed=i)
        for i in range(n)
    ]
    for i in range(0, n, 3):  # penalized, greedy (3, 9) and sampled (0, 6): counts follow slots reused
        samplings[i] = replace(samplings[i], frequency_penalty=1.5, presence_penalty=0.5, repetition_penalty=1.3)

    def ask(cb, i, leave_after=None):
        q = queue.Queue()
        r = cb.submit(prompts[i], samplings[i], q.put)
        while not isinstance(item := q.get(timeout=120), dict):
            if leave_after is not None:
                cb.cancel(r)
                return None
        return item

    alone = ContinuousBatcher(
        model, tok, num_slots=1, max_prompt_tokens=96, max_new_tokens=12, prefill_tokens=4096, prefix_cache=False
    )
    want = [ask(alone, i)["text"] for i in range(n)]
    reused = 0
    configs = (  # (prefill budget, slots, fast step, graphs, a host prefix store)
        (g.choice([3, 5, 9]), 2, True, False, 2**22),
        (g.choice([17, 40]), 5, False, True, 0),
        (200, 3, True, True, 2**22),
    )
    stored = 0
    for budget, slots, fast, graphs, store in configs:
        kw = dict(num_slots=slots, max_prompt_tokens=96, max_new_tokens=12, prefill_tokens=budget, fast_decode=fast)
        cb = ContinuousBatcher(model, tok, prefix_store_bytes=store, **kw)
        if graphs:
            cpu_graphs(cb)
        leaving = set(g.sample(range(n), 2))
        delays = [g.random() * 0.05 for _ in range(n)]
        got = [None] * n

        def client(i, cb=cb, got=got, leaving=leaving, delays=delays):
            time.sleep(delays[i])
            got[i] = ask(cb, i, 1 if i in leaving else None)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        stayed = [i for i in range(n) if i not in leaving]
        assert [got[i] and got[i]["text"] for i in stayed] == [want[i] for i in stayed], (budget, slots, fast, graphs)
        assert [got[i]["prompt_tokens"] for i in stayed] == [lengths[i] for i in stayed]
        reused += sum(got[i]["cached_tokens"] for i in stayed)
        deadline = time.time() + 10  # a client that left is freed at the loop's next step
        while (cb.live or cb.prefilling or cb.waiting) and time.time() < deadline:
            time.sleep(0.01)
        assert not cb.live and not cb.prefilling and not cb.waiting
        stored += cb.store.saved if cb.store is not None else 0
        cb.close()
    alone.close()
    assert reused > 0 and stored > 0  # some of them did start from what a slot held; slots' prefixes were kept
