"""Self-chat filters and near-duplicate removal (pure functions), and the self-chat loop with a
scripted generator."""

from dataclasses import replace

import numpy as np
import torch

from cerbero_ray.generate.dedup import embed, jaccard, near_duplicates, near_duplicates_cosine, shingles
from cerbero_ray.generate.selfchat import degenerate, repeated_trigram_ratio, self_chat, user_prompt
from cerbero_ray.inference.sampling import Sampling, cut_at_stop
from conftest import counting_prefill

BASE = (
    "La fotosintesi è il processo con cui le piante trasformano la luce del sole in energia chimica, "
    "producendo ossigeno e zuccheri a partire da acqua e anidride carbonica."
)


def test_near_duplicates_keep_the_first_of_each_group():
    texts = [
        BASE,
        BASE.replace("piante", "alghe"),
        "Roma è la capitale d'Italia e conta quasi tre milioni di abitanti.",
        BASE,
        "Un testo del tutto diverso sulla cucina napoletana e la pizza margherita.",
    ]
    dup = near_duplicates(texts, n=3, threshold=0.7)
    assert dup == [None, 0, None, 0, None]
    assert (
        jaccard(shingles(texts[0], 3), shingles(texts[1], 3))
        >= 0.7
        > jaccard(shingles(texts[0], 3), shingles(texts[2], 3))
    )
    assert near_duplicates(texts, n=3, threshold=0.99) == [None, None, None, 0, None]


def test_cosine_near_duplicates_keep_the_first_of_each_group_and_find_every_close_pair():
    rng = np.random.default_rng(0)
    base = rng.standard_normal((300, 48))
    close = base[:100] + 0.03 * rng.standard_normal((100, 48))  # cosine ~0.999 with its original
    far = base[100:200] + 1.5 * rng.standard_normal((100, 48))  # cosine ~0.55
    emb = np.concatenate([base, close, far])
    dup = near_duplicates_cosine(emb, threshold=0.9)
    assert dup[:300] == [None] * 300
    assert dup[300:400] == list(range(100))  # LSH missed none of the close pairs
    assert dup[400:] == [None] * 100
    assert near_duplicates_cosine(emb[:2], threshold=0.9) == [None, None]
    assert near_duplicates_cosine(np.zeros((0, 4))) == []


def test_centring_removes_the_direction_every_vector_shares():
    rng = np.random.default_rng(1)
    texts = rng.standard_normal((20, 32))
    hidden = 50 + texts  # a language model's states: a large shared component, the text a small part
    assert all(d == 0 for d in near_duplicates_cosine(hidden, threshold=0.9)[1:])  # raw: all "the same"
    centred = near_duplicates_cosine(np.concatenate([hidden, hidden[3:4]]), threshold=0.9, center=True)
    assert centred == [None] * 20 + [3]
    assert near_duplicates_cosine(np.stack([hidden[0], hidden[0]]), threshold=0.9, center=True) == [None, 0]


def test_embed_mean_pools_each_text_alone_whatever_the_batch(tok):
    from cerbero_ray.models import tiny

    body = tiny().eval().model
    texts = ["Ciao!", BASE, "Roma è la capitale d'Italia."]
    together = embed(body, tok, texts, batch_size=3)
    for t, row in zip(texts, together):
        ids = torch.tensor([tok(t, add_special_tokens=False).input_ids])
        with torch.no_grad():
            alone = body(input_ids=ids).last_hidden_state[0].mean(0).numpy()
        np.testing.assert_allclose(row, alone, rtol=1e-4, atol=1e-5)
    cut = embed(body, tok, [BASE], max_tokens=4)[0]
    with torch.no_grad():
        first4 = body(input_ids=torch.tensor([tok(BASE, add_special_tokens=False).input_ids[:4]])).last_hidden_state[0]
    np.testing.assert_allclose(cut, first4.mean(0).numpy(), rtol=1e-4, atol=1e-5)


def test_degenerate_turns():
    ok = {"text": "La capitale d'Italia è Roma, sede del governo.", "finish_reason": "stop"}
    assert degenerate(ok, [], 8, 0.5) is None
    assert degenerate({**ok, "text": "Sì."}, [], 8, 0.5) == "too_short"
    assert degenerate({**ok, "finish_reason": "length"}, [], 8, 0.5) == "unfinished"
    assert degenerate({**ok, "text": ok["text"] + " [|AI|] e poi"}, [], 8, 0.5) == "role_tag"
    assert degenerate({**ok, "text": "molto bene " * 20}, [], 8, 0.5) == "repetitive"
    assert degenerate(ok, [ok["text"]], 8, 0.5) == "repeated_turn"
    assert repeated_trigram_ratio("a b c d e") == 0.0
    assert cut_at_stop("Certo! [|Umano|] e poi", ("[|Umano|]",)) == ("Certo! ", True)


class Scripted:
    """A stand-in for Generator: answers from a script, records the prompts it was given."""

    def __init__(self, tok, script):
        self.tok, self.script, self.prompts = tok, iter(script), []

    def generate(self, prompts, sampling, seed=None):
        self.prompts.append(prompts)
        return [next(self.script) for _ in prompts]


def test_self_chat_alternates_roles_and_ends_at_a_complete_exchange(tok):
    good = lambda t: {"text": t, "finish_reason": "stop"}
    script = [
        good("Roma è la capitale d'Italia."),
        good("Ciao ciao"),  # turn 1: answers to the 2 seeds
        good("E quanti abitanti ha Roma?"),
        good("x"),  # the humans ask; 2nd too short
        good("Circa due milioni e ottocentomila persone."),
    ]  # turn 2: the answer
    gen = Scripted(tok, script)
    s = Sampling(max_new_tokens=32)
    convs, reasons = self_chat(
        gen, ["Qual è la capitale d'Italia?", "Come stai oggi?"], turns=2, sampling=s, user_sampling=s, min_chars=5
    )
    assert [m["role"] for m in convs[0]] == ["user", "assistant", "user", "assistant"]
    assert convs[1] == [{"role": "user", "content": "Come stai oggi?"}, {"role": "assistant", "content": "Ciao ciao"}]
    assert reasons["user_too_short"] == 1
    # the human's turn is prompted with the human's tag after the conversation so far
    assert gen.prompts[1][0].endswith("[|AI|] Roma è la capitale d'Italia.\n[|Umano|]")
    assert user_prompt(tok, convs[0][:2], "AI").endswith("[|Umano|]")


def test_dedup_config_errors_name_the_key(tmp_path):
    import pytest

    from cerbero_ray.config import compose

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    (tmp_path / "m" / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # no tensors

    def check(*overrides):
        compose("generate", [f"generate.checkpoint={tmp_path}/m", *overrides], checked=True)

    check("generate.self_chat.dedup=embedding")  # the generating model's own states: nothing to check
    for bad, msg in (
        (["generate.self_chat.dedup=minhash"], "generate.self_chat.dedup must be one of"),
        (["generate.self_chat.dedup_cosine=1.5"], "generate.self_chat.dedup_cosine must be in"),
        (
            ["generate.self_chat.dedup=embedding", f"generate.self_chat.dedup_model={tmp_path}/nope"],
            "generate.self_chat.dedup_model: no HF model at",
        ),
    ):
        with pytest.raises(ValueError, match=msg):
            check(*bad)


class Waves:
    """The continuous engine seen as a plain generator (``generate`` and ``tok`` only): self-chat
    then runs its half-turn-by-half-turn path on it."""

    def __init__(self, engine):
        self.engine, self.tok = engine, engine.tok

    def generate(self, prompts, sampling, seed=None):
        return self.engine.generate(prompts, sampling, seed=seed)


def test_on_the_continuous_engine_each_conversation_is_a_chain_that_finds_its_own_slot(tok):
    """Six conversations on two slots: run as chains, each turn reuses the conversation so far from
    the slot its previous turn left, where turn-by-turn waves keep only the last two. Greedy, the
    conversations are the same both ways; sampled (seeded), a rerun gives the same ones."""
    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.models import tiny

    model = tiny().eval()
    seeds = ["Qual è la capitale d'Italia?", "Come stai?", "Dimmi un proverbio.", "Perché il mare è salato?"]
    seeds += ["Che cos'è la fotosintesi?", "Chi era Dante?"]
    greedy, sampled = Sampling(max_new_tokens=12, temperature=0.0), Sampling(max_new_tokens=12, temperature=0.8)
    runs = {}
    for way, s in (("chains", greedy), ("waves", greedy), ("sampled", sampled), ("sampled again", sampled)):
        kw = dict(turns=3, sampling=s, user_sampling=replace(s, max_new_tokens=9), min_chars=1, max_repeat=1.0)
        kw.update(drop_unfinished=False, seed=7)
        cb = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=512, max_new_tokens=16)
        computed = counting_prefill(cb)
        convs, reasons = self_chat(cb if way != "waves" else Waves(cb), seeds, **kw)
        assert all(c is not None and len(c) == 6 for c in convs), reasons  # 3 exchanges each
        runs[way] = convs, sum(computed)
        cb.close()
    assert runs["chains"][0] == runs["waves"][0]
    assert runs["sampled"][0] == runs["sampled again"][0] != runs["chains"][0]
    # the chains compute each conversation's tokens at most once (no more than its last prompt
    # holds; the shared system line once per slot), the waves most prompts whole
    render = lambda c: tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)  # noqa: E731
    last = sum(len(x) for x in cb.encode([render(c[:5]) for c in runs["chains"][0]])[0])
    assert runs["chains"][1] <= last < 0.5 * runs["waves"][1]


def test_chains_reuse_their_slot_and_one_whose_follow_up_fails_leaves_the_others_to_end(tok):
    """``ContinuousBatcher.chains``: a chain's next request reuses what its previous one left in its
    slot (its prompt and answer), gives the text that request alone gives, and a ``follow`` that
    raises ends its chain with an error raised once every chain has ended."""
    import pytest

    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.models import tiny

    model = tiny().eval()
    greedy = Sampling(max_new_tokens=8, temperature=0.0, stop=())
    chat = lambda *t: tok.apply_chat_template(  # noqa: E731
        [{"role": ("user", "assistant")[i % 2], "content": x} for i, x in enumerate(t)],
        tokenize=False,
        add_generation_prompt=True,
    )
    cb = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=256, max_new_tokens=8)
    ends: dict[int, list[dict]] = {i: [] for i in range(5)}
    questions = ["Ciao!", "Come stai?", "Dimmi un proverbio.", "Chi era Dante?", "Perché?"]

    def follow(i, end):
        ends[i].append(end)
        if len(ends[i]) == 1:
            return chat(questions[i], end["text"], "E poi?"), greedy
        if i == 3:
            raise KeyError("a bug of the caller")
        return None

    with pytest.raises(RuntimeError, match=r"chain 3: KeyError\('a bug of the caller'\)"):
        cb.chains([(chat(q), greedy) for q in questions], follow)
    assert all(len(e) == 2 for e in ends.values())  # every chain ran both its requests
    for i, (first, second) in ends.items():
        alone = cb.generate([chat(questions[i], first["text"], "E poi?")], greedy)[0]
        assert second["text"] == alone["text"]
        assert second["cached_tokens"] >= first["prompt_tokens"]  # at least its first prompt came from its slot
    cb.close()


def test_a_chain_s_next_request_goes_ahead_of_every_waiting_one_but_the_chains_before_it(tok):
    """The queue order ``chains`` relies on, whatever was admitted in between: a chain's next
    request is queued ahead of the other waiting requests and behind the chains' queued before it
    (also once an earlier one has been admitted from the front in the same step)."""
    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.models import tiny

    cb = ContinuousBatcher(tiny().eval(), tok, num_slots=1, max_prompt_tokens=64, max_new_tokens=4)
    s = Sampling(max_new_tokens=2, temperature=0.0, stop=())
    a, b, f1, f2, f3 = (cb._request([1, 100 + i], s, lambda _: None, False, 0, None) for i in range(5))
    with cb.lock:  # the loop thread waits between steps: nothing is admitted meanwhile
        cb._enqueue([a, b])
        cb._enqueue([f1], first=True)
        cb._enqueue([f2], first=True)
        assert list(cb.waiting) == [f1, f2, a, b]
        with cb._cv:
            del cb.waiting[0]  # f1 admitted, as _plan does
        cb._enqueue([f3], first=True)
        assert list(cb.waiting) == [f2, f3, a, b]
        with cb._cv:
            cb.waiting.clear()
    cb.close()
