"""Self-chat: the model writes both sides of an Italian conversation, as cerbero's data was made.

From a seed (a question or a topic, the first ``[|Umano|]`` turn), the model answers as
``[|AI|]``, then is prompted with ``[|Umano|]`` to write the human's next turn, and so on for
``turns`` exchanges. On the continuous engine each conversation is a chain of requests
(:meth:`ContinuousBatcher.chains`): its next turn is queued as soon as its last one ends, goes ahead
of the waiting requests and finds the conversation so far in the slot it left (prefix reuse), so no
step waits for a turn's slowest answer and however many conversations a chunk has, each turn
computes only its new tokens. On other engines all conversations advance together, one batched
generation per half-turn. A generated turn is *degenerate* when it is empty or too short, unfinished (hit
``max_new_tokens``), mostly repeated word trigrams, leaks a role tag, or repeats an earlier turn;
the conversation then ends at its last complete exchange (and is dropped if it has none). Each
reason is counted. Near-duplicate conversations are removed afterwards across the whole run
(:mod:`cerbero_ray.generate.dedup`). The result is the data stage's ``openai`` input format.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from cerbero_ray.chat import ASSISTANT_TAGS, USER_TAG
from cerbero_ray.inference.continuous import ContinuousBatcher
from cerbero_ray.inference.generator import Generator
from cerbero_ray.inference.sampling import Sampling


def repeated_trigram_ratio(text: str) -> float:
    words = text.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def degenerate(
    turn: dict, history: list[str], min_chars: int, max_repeat: float, drop_unfinished: bool = True
) -> str | None:
    """Why a generated turn is unusable, or None."""
    text = turn["text"]
    if len(text.strip()) < min_chars:
        return "too_short"
    if drop_unfinished and turn["finish_reason"] == "length":
        return "unfinished"
    if "[|" in text or "|]" in text:
        return "role_tag"
    if repeated_trigram_ratio(text) > max_repeat:
        return "repetitive"
    if text.strip() in (h.strip() for h in history):
        return "repeated_turn"
    return None


def user_prompt(tok, messages: list[dict], assistant_tag: str) -> str:
    """The conversation so far, then the human's tag: the model writes the next human turn."""
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    tag = ASSISTANT_TAGS[assistant_tag]
    assert rendered.endswith(tag), "the chat template must end the generation prompt with the assistant tag"
    return rendered[: -len(tag)] + USER_TAG


def self_chat(
    gen: Generator | ContinuousBatcher,
    seeds: list[str],
    *,
    turns: int,
    sampling: Sampling,
    user_sampling: Sampling,
    assistant_tag: str = "AI",
    min_chars: int = 8,
    max_repeat: float = 0.5,
    drop_unfinished: bool = True,
    seed: int = 0,
) -> tuple[list[list[dict] | None], Counter]:
    """Conversations (``messages`` lists, None when dropped) and the count of each filter reason."""
    convs = [[{"role": "user", "content": s.strip()}] for s in seeds]
    reasons: Counter = Counter()
    tok = gen.tok
    limits = (min_chars, max_repeat, drop_unfinished)
    # half-turn h (the answers: even, the human's turns: odd) of every conversation samples as
    # ``gen.generate(..., seed=seed * 1000 + h)`` does its rows
    half = (
        replace(sampling, stop=tuple(sampling.stop)),
        replace(user_sampling, stop=(ASSISTANT_TAGS[assistant_tag], USER_TAG)),
    )

    def prompt(i: int, h: int) -> str:
        if h % 2:
            return user_prompt(tok, convs[i], assistant_tag)
        return tok.apply_chat_template(convs[i], tokenize=False, add_generation_prompt=True)

    if isinstance(gen, ContinuousBatcher):
        done = [0] * len(convs)  # half-turns each conversation has had

        def follow(i: int, turn: dict):
            h = done[i]
            done[i] += 1
            kept = _extend(convs, [i], [turn], ("assistant", "user")[h % 2], limits, reasons)
            if not kept or h + 1 == 2 * turns - 1:
                return None
            return prompt(i, h + 1), _seeded(half[(h + 1) % 2], seed * 1000 + h + 1, i)

        gen.chains([(prompt(i, 0), _seeded(half[0], seed * 1000, i)) for i in range(len(convs))], follow)
    else:
        active = list(range(len(convs)))
        for h in range(2 * turns - 1):
            turn = gen.generate([prompt(i, h) for i in active], half[h % 2], seed=seed * 1000 + h)
            active = _extend(convs, active, turn, ("assistant", "user")[h % 2], limits, reasons)
            if not active:
                break
    out = []
    for c in convs:
        while c and c[-1]["role"] != "assistant":  # end at the last complete exchange
            c.pop()
        out.append(c or None)
    reasons["dropped_no_exchange"] = sum(c is None for c in out)
    return out, reasons


def _seeded(s: Sampling, seed: int, i: int) -> Sampling:
    """Row ``i`` of a ``generate(..., seed=seed)`` call's sampling."""
    return replace(s, seed=seed * 1_000_003 + i)


def _extend(convs, active, turns, role, limits, reasons) -> list[int]:
    still = []
    for i, turn in zip(active, turns):
        why = degenerate(turn, [m["content"] for m in convs[i]], *limits)
        if why:
            reasons[f"{role}_{why}"] += 1
            continue
        convs[i].append({"role": role, "content": turn["text"]})
        still.append(i)
    return still
