"""Self-chat filters and near-duplicate removal (pure functions), and the self-chat loop with a
scripted generator."""
from cerbero_ray.generate.dedup import jaccard, near_duplicates, shingles
from cerbero_ray.generate.engine import Sampling, cut_at_stop
from cerbero_ray.generate.selfchat import degenerate, repeated_trigram_ratio, self_chat, user_prompt

BASE = ("La fotosintesi è il processo con cui le piante trasformano la luce del sole in energia chimica, "
        "producendo ossigeno e zuccheri a partire da acqua e anidride carbonica.")


def test_near_duplicates_keep_the_first_of_each_group():
    texts = [BASE, BASE.replace("piante", "alghe"), "Roma è la capitale d'Italia e conta quasi tre milioni di abitanti.",
             BASE, "Un testo del tutto diverso sulla cucina napoletana e la pizza margherita."]
    dup = near_duplicates(texts, n=3, threshold=0.7)
    assert dup == [None, 0, None, 0, None]
    assert jaccard(shingles(texts[0], 3), shingles(texts[1], 3)) >= 0.7 > jaccard(shingles(texts[0], 3), shingles(texts[2], 3))
    assert near_duplicates(texts, n=3, threshold=0.99) == [None, None, None, 0, None]


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
    script = [good("Roma è la capitale d'Italia."), good("Ciao ciao"),             # turn 1: answers to the 2 seeds
              good("E quanti abitanti ha Roma?"), good("x"),                         # the humans ask; 2nd too short
              good("Circa due milioni e ottocentomila persone.")]                    # turn 2: the answer
    gen = Scripted(tok, script)
    s = Sampling(max_new_tokens=32)
    convs, reasons = self_chat(gen, ["Qual è la capitale d'Italia?", "Come stai oggi?"], turns=2, sampling=s,
                               user_sampling=s, min_chars=5)
    assert [m["role"] for m in convs[0]] == ["user", "assistant", "user", "assistant"]
    assert convs[1] == [{"role": "user", "content": "Come stai oggi?"}, {"role": "assistant", "content": "Ciao ciao"}]
    assert reasons["user_too_short"] == 1
    # the human's turn is prompted with the human's tag after the conversation so far
    assert gen.prompts[1][0].endswith("[|AI|] Roma è la capitale d'Italia.\n[|Umano|]")
    assert user_prompt(tok, convs[0][:2], "AI").endswith("[|Umano|]")
