"""The prompts of each evaluation task, under each protocol. Plain data and string building.

Four protocols, each named for what it is:

- ``generate`` (ours): the task as a yes/no question (EVALITA) or a short-answer reading question
  (SQuAD-it) in the cerbero chat, few-shot turns, greedy decoding of at most ``max_new_tokens``
  tokens cut at the first newline; a yes/no answer is read from its first word (``Sì, è
  misogino`` → yes), an answer that does not start with ``si``/``no`` is *unparsed* (counted, then
  mapped to the nearest label by edit distance). The seed's README shows neither its prompts nor its
  parsing: this is our reading of its table headers (5-shot yes/no questions, SQuAD-it 3-shot).
- ``choice`` (ours): ``generate`` with the answer held to exactly ``si`` or ``no`` by constrained
  decoding (a choice grammar: llguidance on HF weights, a GBNF grammar in llama.cpp,
  ``guided_choice`` to an endpoint). Nothing is left unparsed by construction; beside ``generate`` it
  measures what the free answer's parsing costs.
- ``score`` (ours): the same prompts; the log-probability of ``si`` and of ``no`` as the
  assistant's whole answer, no generation, no parsing.
- ``benchita``: the authors' later public harness (galatolofederico/benchita) as we read its code:
  a system prompt naming upper-case labels (``MISOGINO`` / ``NON_MISOGINO``), each shot the text as
  the user's turn and its label as the answer, greedy generation, the answer mapped by prefix to a
  label or to an unknown class, scikit-learn's ``classification_report`` (macro and weighted F1);
  SQuAD-it with a system prompt, context and question as the user's turn, 100 new tokens, the
  SQuAD v2 metric against the first gold answer. Our wording, its structure; its shots come from our
  held-out pool (benchita samples them from the whole file, scored rows included).

Several prompt wordings per task (``PROMPTS``; the first is the one our tables have used), as the
Evalita-LLM leaderboard evaluates every task against several prompts.
"""

from __future__ import annotations

YES, NO = "si", "no"
ANSWER_PREFIX = "Risposta breve:"

# EVALITA: the human's turn, ``{text}`` where the text goes; the answer is si/no
PROMPTS = {
    "ami2020": [
        "Dato questo testo:\n{text}\nIl suo contenuto è misogino? (si/no)",
        "Leggi questo tweet:\n{text}\nÈ un tweet misogino? Rispondi si o no.",
        "Testo: {text}\nDomanda: il testo esprime misoginia? Rispondi con si oppure no.",
    ],
    "ironita": [
        "Dato questo testo:\n{text}\nIl suo contenuto è ironico? (si/no)",
        "Leggi questo tweet:\n{text}\nÈ un tweet ironico? Rispondi si o no.",
        "Testo: {text}\nDomanda: il testo è ironico? Rispondi con si oppure no.",
    ],
    "sentipolc": [
        "Dato questo testo:\n{text}\nIl suo contenuto è negativo? (si/no)",
        "Leggi questo tweet:\n{text}\nIl sentimento di questo tweet è negativo? Rispondi si o no.",
        "Testo: {text}\nDomanda: il testo esprime un sentimento negativo? Rispondi con si oppure no.",
    ],
    # SQuAD-it: (the human's turn with {context} and {question}, the shot answer's prefix)
    "squad": [
        ("Dato il seguente testo:\n{context}\nRispondi brevemente a questa domanda:\n{question}", ANSWER_PREFIX + " "),
        ("Contesto:\n{context}\nDomanda: {question}\nRispondi con poche parole prese dal contesto.", ""),
    ],
}

# benchita: the labels (0, 1) in upper case, and the system prompt naming them
BENCHITA_LABELS = {
    "ami2020": ("NON_MISOGINO", "MISOGINO"),
    "ironita": ("NON_IRONICO", "IRONICO"),
    "sentipolc": ("POSITIVO", "NEGATIVO"),  # benchita's binary reading of `negativo`
}
BENCHITA_WHAT = {"ami2020": "misogino", "ironita": "ironico", "sentipolc": "negativo"}
BENCHITA_UNKNOWN = "<UNKNOWN>"
BENCHITA_SQUAD_SYSTEM = "Leggi il testo e rispondi alla domanda che segue con una risposta breve e precisa."
BENCHITA_MAX_NEW_TOKENS = {"squad": 100, "evalita": 10}


def benchita_system(kind: str) -> str:
    no, yes = BENCHITA_LABELS[kind]
    return (
        f"Classifica ogni tweet che ricevi: {yes} se è {BENCHITA_WHAT[kind]}, {no} altrimenti. "
        f"Rispondi soltanto con l'etichetta, {yes} oppure {no}, senza spiegazioni."
    )


def evalita_turn(kind: str, prompt: int, text: str) -> str:
    return PROMPTS[kind][prompt].replace("{text}", text)


def squad_turn(prompt: int, context: str, question: str) -> str:
    return PROMPTS["squad"][prompt][0].replace("{context}", context).replace("{question}", question)


def squad_messages(prompt: int, row: dict, shots: list[dict]) -> list[dict]:
    """The generate protocol's chat: each shot a turn and its (prefixed) first answer, then the row."""
    prefix = PROMPTS["squad"][prompt][1]
    out = []
    for s in shots:
        out += [
            {"role": "user", "content": squad_turn(prompt, s["context"], s["question"])},
            {"role": "assistant", "content": prefix + s["answers"][0]},
        ]
    return out + [{"role": "user", "content": squad_turn(prompt, row["context"], row["question"])}]


def benchita_squad_messages(row: dict, shots: list[dict]) -> list[dict]:
    out = [{"role": "system", "content": BENCHITA_SQUAD_SYSTEM}]
    for s in shots:
        out += [
            {"role": "user", "content": f"{s['context']}\n{s['question']}"},
            {"role": "assistant", "content": s["answers"][0]},
        ]
    return out + [{"role": "user", "content": f"{row['context']}\n{row['question']}"}]


def benchita_evalita_messages(kind: str, row: dict, shots: list[dict]) -> list[dict]:
    labels = BENCHITA_LABELS[kind]
    out = [{"role": "system", "content": benchita_system(kind)}]
    for s in shots:
        out += [{"role": "user", "content": s["text"]}, {"role": "assistant", "content": labels[s["gold"]]}]
    return out + [{"role": "user", "content": row["text"]}]
