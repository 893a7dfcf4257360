"""Constrained decoding (llguidance): constrained greedy output equals transformers' greedy output
under the same mask (a logits processor applying the matcher's bitmask to ``generate``), for a JSON
schema, a regex and a choice list; constrained and free rows share a batch; a constraint that
cannot run is refused before it is queued. CPU, tiny model, no Ray."""

import json

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from cerbero_ray.inference import grammar as G
from cerbero_ray.inference.continuous import ContinuousBatcher
from cerbero_ray.inference.sampling import Sampling
from cerbero_ray.models import tiny
from conftest import DEVICES

pytest.importorskip("llguidance")

SCHEMA = {
    "type": "object",
    "properties": {
        "argomento": {"type": "string", "maxLength": 16},
        "luoghi": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
        "opinione": {"type": "boolean"},
    },
    "required": ["argomento", "luoghi", "opinione"],
    "additionalProperties": False,
}
CONSTRAINTS = {
    "json_schema": ("json_schema", SCHEMA),
    "regex": ("regex", r"[0-9]{2}/[0-9]{2}/(19|20)[0-9]{2}"),
    "choice": ("choice", ["sì", "no", "non so"]),
}


class Masked(LogitsProcessor):
    """The reference: the same matcher's bitmask applied to ``generate``'s scores (batch of one)."""

    def __init__(self, tok, g: str, prompt_len: int):
        self.m, self.n, self.seen = G.Matcher(tok, g), prompt_len, 0

    def __call__(self, input_ids, scores):
        new = input_ids[0, self.n :].tolist()
        for t in new[self.seen :]:
            self.m.consume(t)
        self.seen = len(new)
        bits = G.bitmask(1, scores.shape[-1])
        self.m.fill(bits, 0)
        return G.mask_logits(scores, bits)


@pytest.fixture(scope="module")
def model():
    return tiny().eval()


def _prompt(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", list(CONSTRAINTS))
def test_constrained_greedy_equals_generate_under_the_same_mask(model, tok, name):
    g = G.grammar(*CONSTRAINTS[name])
    prompt = _prompt(tok, "Di che cosa parla questa domanda: dov'è il Colosseo?")
    cb = ContinuousBatcher(model, tok, num_slots=2, max_prompt_tokens=256, max_new_tokens=96)
    got = cb.generate([prompt], Sampling(max_new_tokens=96, temperature=0.0, stop=(), grammar=g))[0]
    (ids,), _ = cb.encode([prompt])
    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            max_new_tokens=97,  # one more: where our engine stops at the grammar's end, generate's mask leaves EOS
            do_sample=False,
            logits_processor=LogitsProcessorList([Masked(tok, g, len(ids))]),
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.eos_token_id,
        )[0, len(ids) :].tolist()
    if out and out[-1] == tok.eos_token_id:
        out = out[:-1]
    assert got["text"] == tok.decode(out, skip_special_tokens=True).strip()
    assert got["finish_reason"] == "stop" and got["constraint"] == "complete"
    if name == "json_schema":
        value = json.loads(got["text"])
        assert set(value) == {"argomento", "luoghi", "opinione"} and isinstance(value["opinione"], bool)
    elif name == "choice":
        assert got["text"] in ("sì", "no", "non so")
    else:
        import re

        assert re.fullmatch(CONSTRAINTS["regex"][1], got["text"])


def test_constrained_and_free_rows_share_a_batch_and_the_free_ones_are_unchanged(model, tok):
    prompts = [_prompt(tok, t) for t in ("Ciao!", "Perché il cielo è blu?", "Dimmi un proverbio.")]
    free = Sampling(max_new_tokens=12, temperature=0.0, stop=())
    cb = ContinuousBatcher(model, tok, num_slots=4, max_prompt_tokens=256, max_new_tokens=64)
    alone = cb.generate(prompts, free)
    g = G.grammar(*CONSTRAINTS["json_schema"])
    mixed = cb.run(
        [
            (prompts[0], free),
            (prompts[1], Sampling(max_new_tokens=64, temperature=0.0, stop=(), grammar=g)),
            (prompts[2], free),
        ]
    )
    assert [mixed[0]["text"], mixed[2]["text"]] == [alone[0]["text"], alone[2]["text"]]
    assert "constraint" not in mixed[0] and json.loads(mixed[1]["text"])["opinione"] in (True, False)
    # seeded sampling under a constraint: reproducible, and still inside the grammar
    s = Sampling(
        max_new_tokens=8,
        temperature=1.0,
        top_p=1.0,
        seed=5,
        stop=(),
        grammar=G.grammar("choice", ["alfa", "beta", "gamma"]),
    )
    picks = {cb.run([(p, s)])[0]["text"] for p in prompts for _ in range(2)}
    assert picks <= {"alfa", "beta", "gamma"}
    assert cb.run([(prompts[0], s)])[0]["text"] == cb.run([(prompts[0], s)])[0]["text"]


@pytest.mark.parametrize("device", DEVICES)
def test_constrained_rows_ending_while_the_next_step_runs_give_their_alone_text(model, tok, device):
    """A constrained step launches its forward before the previous step's tokens are handed out
    (each matcher needs its row's newest token while the forward runs): rows that end in that
    hand-out (grammar complete, a stop string, the token limit) are dropped from the step, and rows
    admitted between steps into the freed slots start clean. Six requests through three slots, each
    one's text equal to its own run alone (on CUDA: the two halves as captured graphs)."""
    texts = ("Ciao!", "Perché il cielo è blu?", "Dimmi un proverbio.", "Dov'è Napoli?", "Che ore sono?", "Grazie")
    prompts = [_prompt(tok, t) for t in texts]
    free = Sampling(max_new_tokens=20, temperature=0.0, stop=())
    stopped = Sampling(max_new_tokens=20, temperature=0.0, stop=(" ",))
    held = {
        k: Sampling(max_new_tokens=48, temperature=0.0, stop=(), grammar=G.grammar(*v)) for k, v in CONSTRAINTS.items()
    }
    cut = Sampling(max_new_tokens=4, temperature=0.0, stop=(), grammar=G.grammar(*CONSTRAINTS["json_schema"]))
    items = list(zip(prompts, [held["json_schema"], free, held["regex"], stopped, held["choice"], cut]))
    m = model if device == "cpu" else tiny().to(device).eval()
    cb = ContinuousBatcher(m, tok, num_slots=3, max_prompt_tokens=256, max_new_tokens=64, cuda_graphs=True)
    together = cb.run(items)
    alone = [cb.run([it])[0] for it in items]
    for got, want in zip(together, alone):
        assert (got["text"], got["finish_reason"], got.get("constraint")) == (
            want["text"],
            want["finish_reason"],
            want.get("constraint"),
        )
    assert [r.get("constraint") for r in together] == ["complete", None, "complete", None, "complete", "incomplete"]
    assert not cb.live and cb.pending is None or all(r.done for r in cb.pending.rows)
    halves = {k[0] for k in cb.slots.step_graphs if isinstance(k[0], str)}
    assert halves == ({"forward", "pick"} if device == "cuda" else set()) and cb.slots.graph_error is None


def test_a_constraint_cut_by_the_token_limit_says_so(model, tok):
    g = G.grammar(*CONSTRAINTS["json_schema"])
    cb = ContinuousBatcher(model, tok, num_slots=1, max_prompt_tokens=256, max_new_tokens=64)
    r = cb.generate([_prompt(tok, "Ciao")], Sampling(max_new_tokens=3, temperature=0.0, stop=(), grammar=g))[0]
    assert r["finish_reason"] == "length" and r["constraint"] == "incomplete" and r["new_tokens"] == 3


@pytest.mark.parametrize(
    "kind, value, says",
    [
        ("regex", "(si|no", "invalid regular expression"),
        ("choice", [], "at least one non-empty string"),
        ("json_schema", {"type": "string", "format": "codice-fiscale"}, "Unknown format"),
        ("json_schema", {"$ref": "#/definitions/nope"}, "does not exist"),
        ("json_schema", ["not", "an", "object"], "must be an object"),
        ("grammar", "x", "unknown constraint"),
    ],
)
def test_a_constraint_that_cannot_run_is_refused_naming_why(model, tok, kind, value, says):
    cb = ContinuousBatcher(model, tok, num_slots=1, max_prompt_tokens=64, max_new_tokens=8)
    with pytest.raises(ValueError, match=says):
        g = G.grammar(kind, value)
        G.check(tok, g)
        cb.submit([1, 2, 3], Sampling(max_new_tokens=4, grammar=g), lambda x: None)


@pytest.mark.parametrize("vocab, dtype", [(32000, torch.float32), (32003, torch.bfloat16), (31999, torch.float32)])
def test_the_mask_forbids_exactly_the_tokens_whose_bit_is_clear(vocab, dtype):
    """The CPU mask (a byte lookup) against each token's bit read one by one."""
    g = torch.Generator().manual_seed(vocab)
    bits = torch.randint(-(2**31), 2**31 - 1, (3, (vocab + 31) // 32), dtype=torch.int32, generator=g)
    logits = torch.randn(3, vocab, generator=g).to(dtype)
    out = G.mask_logits(logits, bits)
    tok = torch.arange(vocab)
    allowed = ((bits[:, tok // 32] >> (tok % 32)) & 1).bool()
    assert out.dtype == dtype and torch.equal(out[allowed], logits[allowed])
    assert torch.isinf(out[~allowed]).all() and (out[~allowed] < 0).all()
    assert torch.equal(G.mask_logits(logits, bits[1:2].expand(3, -1)), G.mask_logits(logits, bits[1:2].repeat(3, 1)))
