"""Label scoring: the one-pass, shared-prompt scores equal scoring each label's continuation alone."""

import numpy as np
import pytest
import torch

from cerbero_ray.config.label_task import LabelTask, load_task, task_from_dict
from cerbero_ray.inference.label_prompts import continuations, prompt_hash, prompt_text
from cerbero_ray.inference.scorer import Scorer, plan_batches
from cerbero_ray.models import tiny

TASK = LabelTask(
    "sentiment",
    "Classifica il sentimento del testo.",
    {"positive": "Positivo", "negative": "Negativo", "mixed": "Misto ma non troppo"},
    [{"text": "Che bello!", "label": "positive"}],
)
TEXTS = [
    "Oggi è una giornata splendida.",
    "Il servizio è stato pessimo e lento, non tornerò mai più in quel posto.",
    "Mah.",
    "Non saprei cosa dire di questo film: alcune scene belle, altre noiose.",
]


def reference(model, tok, task, text):
    """Each label scored by its own full forward pass over prompt + continuation."""
    rendered = prompt_text(task, text, tok)
    assert rendered.startswith("<s>")  # the template's BOS; anything after it is text
    prompt = [tok.bos_token_id] + tok(rendered[3:], add_special_tokens=False, split_special_tokens=True).input_ids
    out = {}
    for label, cont in continuations(task, tok).items():
        ids = torch.tensor([prompt + cont])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), -1)
        out[label] = sum(logp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont))
    return out


@pytest.mark.parametrize("max_batch_tokens", [1, 300, 100000])  # one row per batch, a few, all at once
def test_scores_equal_separate_passes(tok, max_batch_tokens):
    model = tiny().eval()
    scorer = Scorer(model, tok, TASK, max_batch_tokens=max_batch_tokens, sort_window=3)
    got = scorer.score(TEXTS)
    for text, g in zip(TEXTS, got):
        ref = reference(model, tok, TASK, text)
        for label in TASK.labels:
            assert g["logprobs"][label] == pytest.approx(ref[label], abs=1e-3)
        assert g["label"] == max(ref, key=ref.get)
        assert sum(g["probs"].values()) == pytest.approx(1.0) and not g["truncated"]


def test_a_batch_out_of_memory_is_scored_again_in_halves_and_a_row_that_cannot_fit_is_an_error(tok, caplog):
    """A batch that runs out of memory (a card smaller than max_batch_tokens assumed) is scored
    again in smaller batches, to the same scores, and the smaller budget stays; a row that does not
    fit alone is an error row, the others scored."""
    import logging

    caplog.set_level(logging.WARNING, logger="cerbero_ray")
    model = tiny().eval()
    want = Scorer(model, tok, TASK, max_batch_tokens=100000).score(TEXTS)
    scorer = Scorer(model, tok, TASK, max_batch_tokens=100000)
    real, seen = model.model.forward, []

    def forward(*a, input_ids=None, **k):  # a card that holds 2 rows of these prompts, or 250 tokens
        seen.append(tuple(input_ids.shape))
        if input_ids.shape[0] > 2 or (input_ids.shape[0] == 1 and input_ids.shape[1] > 250):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real(*a, input_ids=input_ids, **k)

    scorer.model.model.forward = forward
    got = scorer.score(TEXTS)
    for g, w in zip(got, want):
        assert g["label"] == w["label"] and "error" not in g
        assert all(g["logprobs"][k] == pytest.approx(w["logprobs"][k], abs=1e-4) for k in TASK.labels)
    assert scorer.max_batch_tokens < 100000 and any("ran out of memory" in r.getMessage() for r in caplog.records)
    long = "Una frase molto lunga, ripetuta. " * 40  # alone beyond the 250 tokens the card holds
    got = scorer.score([TEXTS[0], long, TEXTS[1]])
    assert got[1]["label"] is None and got[1]["error"].startswith("out of memory: this row alone (")
    assert [g["label"] for g in (got[0], got[2])] == [want[0]["label"], want[1]["label"]]


def test_multi_token_labels_sum_every_token(tok):
    conts = continuations(TASK, tok)
    assert len(conts["mixed"]) > len(conts["positive"]) >= 3  # verbalizer pieces + newline + </s>
    assert conts["positive"][-1] == tok.eos_token_id


def test_long_texts_are_truncated_by_policy(tok):
    scorer = Scorer(tiny().eval(), tok, TASK, max_text_tokens=8)
    long_text = "parola " * 100
    (r,) = scorer.score([long_text])
    prompts, cut = scorer.encode([long_text, "breve"])
    assert r["truncated"] and cut == [True, False] and len(prompts[0]) < len(tok(long_text).input_ids)


def test_special_token_strings_in_a_text_are_text(tok):
    model = tiny().eval()
    scorer = Scorer(model, tok, TASK)
    text = "Bello </s> davvero <s>"
    (prompt,), _ = scorer.encode([text])
    assert prompt.count(tok.bos_token_id) == 1 and tok.eos_token_id not in prompt
    (r,) = scorer.score([text])
    ref = reference(model, tok, TASK, text)
    assert all(r["logprobs"][k] == pytest.approx(ref[k], abs=1e-3) for k in TASK.labels)


def test_plan_batches_respects_the_budget_and_keeps_every_row():
    lengths = [5, 50, 7, 30, 30, 2, 90, 11]
    batches = plan_batches(lengths, extra=4, max_tokens=120, window=4)
    assert sorted(i for b in batches for i in b) == list(range(8))
    for b in batches:
        assert len(b) == 1 or len(b) * (max(lengths[i] for i in b) + 4) <= 120
        assert all(i // 4 == b[0] // 4 for i in b)  # never across a window


def test_task_validation_and_user_yaml(tmp_path, tok):
    with pytest.raises(ValueError, match="at least two"):
        LabelTask("t", "i", {"a": "A"})
    with pytest.raises(ValueError, match="distinct"):
        LabelTask("t", "i", {"a": "Sì", "b": "Sì"})
    with pytest.raises(ValueError, match="few_shot"):
        LabelTask("t", "i", {"a": "A", "b": "B"}, [{"text": "x", "label": "c"}])
    with pytest.raises(ValueError, match="unknown keys"):
        task_from_dict({"name": "t", "instruction": "i", "labels": {"a": "A", "b": "B"}, "verbalisers": {}})
    f = tmp_path / "topic.yaml"
    f.write_text(
        "name: topic\ninstruction: Di che argomento parla il testo?\nlabels:\n  sport: Sport\n  politics: Politica\n"
    )
    t = load_task(str(f))
    assert t.labels == {"sport": "Sport", "politics": "Politica"}
    assert prompt_hash(t, tok) != prompt_hash(TASK, tok) and len(prompt_hash(t, tok)) == 16


def test_the_shared_prefix_is_computed_once_and_changes_nothing(tok):
    model = tiny().eval()
    shared = Scorer(model, tok, TASK, max_batch_tokens=300)
    alone = Scorer(model, tok, TASK, max_batch_tokens=300, min_shared_prefix=10**9)
    prompts, _ = shared.encode(TEXTS)
    n, cache = shared._shared_prefix(prompts)
    assert n > len(prompts[0]) // 3 and cache is not None  # the few-shot example and the instruction
    assert all(p[:n] == prompts[0][:n] for p in prompts) and alone._shared_prefix(prompts) == (0, None)
    np.testing.assert_allclose(shared.score_ids(prompts), alone.score_ids(prompts), atol=1e-4)


def test_prompts_longer_than_the_sliding_window_are_refused_per_row(tok):
    from cerbero_ray.inference.batch import label_columns

    plain = tiny().eval()
    windowed = tiny(overrides={"sliding_window": 200}).eval()  # the same weights (seed 0), a window
    scorer = Scorer(windowed, tok, TASK, max_text_tokens=512)
    long_text = "una parola dopo l'altra " * 40
    got = scorer.score([TEXTS[0], long_text, TEXTS[2]])
    assert got[1]["label"] is None and "sliding window (200 tokens)" in got[1]["error"]
    ref = Scorer(plain, tok, TASK).score([TEXTS[0], TEXTS[2]])  # within the window: the same scores
    for g, r in zip([got[0], got[2]], ref):
        assert g["label"] == r["label"] and g["logprobs"] == pytest.approx(r["logprobs"], abs=1e-4)
    cols = label_columns(scorer, [TEXTS[0], long_text])
    assert cols["error"] == [None, "too_long_for_window"] and cols["label"][1] is None


def test_the_guard_is_held_per_batch_not_per_call(tok):
    """A server passes its model lock as ``guard``: it is entered once for the shared prefix and once
    per batch, and left between them (a chat step can run there); the scores do not change."""
    import contextlib

    model = tiny().eval()
    entered, held = [], []

    @contextlib.contextmanager
    def guard():
        entered.append(1)
        held.append(True)
        yield
        held.pop()

    scorer = Scorer(model, tok, TASK, max_batch_tokens=1)  # one row per batch
    texts = [TEXTS[0]] * 2 + TEXTS
    guarded = scorer.score(texts, guard)
    assert len(entered) == 1 + len(texts) and held == []
    plain = Scorer(model, tok, TASK, max_batch_tokens=100000).score(texts)
    for a, b in zip(guarded, plain):
        assert a["label"] == b["label"] and all(abs(a["probs"][k] - b["probs"][k]) < 1e-6 for k in a["probs"])


def test_task_names_are_checked_and_values_quoted_short():
    base = {"name": "t", "instruction": "Q?", "labels": {"yes": "Sì", "no": "No"}}
    for labels, said in [
        ({"yes": "Sì", "Yes": "No"}, "one label"),
        ({"yes": "Sì", " ": "No"}, "empty or blank"),
        ({"yes": "Sì", "no": "Sì "}, "the same verbalizer"),
        ({"yes": "Sì", "no": "  "}, "is blank"),
        ({"yes": "Sì", "no": "n" * 10_000}, "at most 256"),
    ]:
        with pytest.raises(ValueError, match=said) as e:
            task_from_dict({**base, "labels": labels})
        assert len(str(e.value)) < 300
    with pytest.raises(ValueError, match="not blank"):
        task_from_dict({**base, "instruction": " \n "})
    with pytest.raises(ValueError) as e:
        task_from_dict({**base, "template": "x" * 100_000})
    assert len(str(e.value)) < 200


def test_a_template_places_the_instruction_where_it_says(tok):
    plain = LabelTask("t", "Il testo è ironico?", {"yes": "Sì", "no": "No"}, template="Testo: {text}")
    placed = LabelTask("t", "Il testo è ironico?", {"yes": "Sì", "no": "No"}, template="{instruction}\nTesto: {text}")
    assert "ironico" not in prompt_text(plain, "ciao {instruction}", tok)  # a template without the slot: left out
    rendered = prompt_text(placed, "ciao {instruction}", tok)
    assert "Il testo è ironico?\nTesto: ciao {instruction}" in rendered  # the text's own braces stay as they are


def test_a_huge_text_is_cut_as_its_whole_tokenization_cuts_it_tokenizing_only_its_head(tok, monkeypatch):
    """A row of 10 MB was tokenized whole (10 s, 0.9 GB) to keep its first ``max_text_tokens``:
    one of 100 MB would stall or kill its actor. Only its head is tokenized now, and the prompt is
    the one the whole text's tokens give, for text with spaces, newlines, accents and emoji, a
    word longer than the head, and texts under the budget."""
    import random

    from cerbero_ray import tokenizer
    from cerbero_ray.inference.label_prompts import text_prompts
    from cerbero_ray.tokenizer import cut_chars, text_head

    rng = random.Random(0)
    words = ["perché", "città", "l'uomo", "è", "🙂", "casa\n", "\tnota", "ciao,", "Verità"] + TEXTS
    texts = [" ".join(rng.choices(words, k=k)) for k in (5, 800, 5_000, 60_000)]
    texts += ["a" * 30_000, "parola" + "x" * 40_000 + " fine", "🙂" * 20_000]

    def whole(text, n):  # the way before: the whole text tokenized, its first n tokens kept
        ids = tokenizer.encode_plain(tok, [text])[0]
        return (tok.decode(ids[:n]) if len(ids) > n else text), len(ids) > n

    budget = cut_chars(64, tok)
    assert budget == (64 + 64) * 16  # the Mistral vocabulary's longest entry: 16 characters
    seen = []
    real = tokenizer.encode_plain
    monkeypatch.setattr(tokenizer, "encode_plain", lambda t, xs: seen.extend(map(len, xs)) or real(t, xs))
    prompts, cut = text_prompts(TASK, tok, texts, 64)
    assert max(seen) <= budget and len(text_head("x " * 10**6, 64, tok)) <= budget  # never the whole 2 MB
    monkeypatch.undo()
    kept = [whole(x, 64) for x in texts]
    assert cut == [c for _, c in kept] == [False] + [True] * 6
    assert prompts == [prompt_text(TASK, x, tok) for x, _ in kept]


def test_a_huge_prompt_keeps_the_last_tokens_its_whole_text_gives_from_its_tail_alone(tok):
    """The generate stage keeps an over-long prompt's last tokens (:func:`encode_prompts`): it
    tokenizes only the text's end now (:func:`text_tail`), and the prompt's tokens are the same."""
    import random

    from cerbero_ray.inference.batch import chat_prompt
    from cerbero_ray.tokenizer import encode_prompts, longest_piece, text_tail

    rng = random.Random(1)
    words = ["perché", "città", "è", "🙂", "casa\n", "\tnota", "ciao,"] + TEXTS
    texts = [" ".join(rng.choices(words, k=k)) for k in (10, 3_000, 40_000)] + ["b" * 30_000, "fine " + "y" * 20_000]
    for text in texts:
        short = text_tail(text, 128, tok)
        assert len(short) <= (128 + 64) * longest_piece(tok) and text.endswith(short)
        assert encode_prompts(tok, [chat_prompt(tok, short)], 128) == encode_prompts(tok, [chat_prompt(tok, text)], 128)


def test_the_generate_stage_hands_the_engine_a_huge_text_s_tail_only(tok):
    from cerbero_ray.config.sampling import Sampling
    from cerbero_ray.inference.batch import generate_columns

    class Engine:  # what the stage's engine is given, and its prompt budget
        max_prompt_tokens = 64

        def generate(self, prompts, sampling, seed=None):
            self.prompts = prompts
            return [{"text": "ok", "finish_reason": "stop", "prompt_tokens": 64, "new_tokens": 1} for _ in prompts]

    engine = Engine()
    cols = generate_columns(engine, tok, ["Ciao!", "parola " * 10**6], Sampling(), 0)
    assert cols["completion"] == ["ok", "ok"] and "Ciao!" in engine.prompts[0]
    assert len(engine.prompts[1]) < 5_000 and engine.prompts[1].count("parola") > 100
