"""The inference core as Ray Data transforms: label_dataset and generate_dataset add their columns
to a user's Dataset, agree with the engines run directly, and turn bad rows into error rows."""

import pytest

from cerbero_ray.inference import generate_dataset, get_task, label_dataset
from cerbero_ray.inference.sampling import Sampling

pytestmark = pytest.mark.integration

TEXTS = ["Che bella giornata!", "", "Il treno è in ritardo, di nuovo.", None, "Non so cosa pensare."]


def test_label_dataset_adds_labels_like_the_scorer(tiny_hf, ray_local):
    import ray

    from cerbero_ray.inference.scorer import Scorer
    from cerbero_ray.models import load_for_inference

    ds = ray.data.from_items([{"doc": i, "text": t} for i, t in enumerate(TEXTS)])
    rows = sorted(label_dataset(ds, tiny_hf, "sentiment", batch_size=2).take_all(), key=lambda r: r["doc"])
    task = get_task("sentiment")
    labels = list(task.labels)
    assert [r["doc"] for r in rows] == list(range(len(TEXTS))) and all(r["text"] == t for r, t in zip(rows, TEXTS))
    assert [r["error"] for r in rows] == [None, "empty", None, "no_text", None]
    model, tok = load_for_inference(tiny_hf)
    good = [t for t in TEXTS if t]
    expected = Scorer(model, tok, task).score(good)
    got = [r for r in rows if r["error"] is None]
    for r, e in zip(got, expected):
        assert r["label"] == e["label"]
        assert all(abs(r[f"p_{k}"] - e["probs"][k]) < 1e-5 for k in labels)
    assert all(r["label"] is None for r in rows if r["error"])


def test_generate_dataset_answers_like_the_engine(tiny_hf, ray_local):
    import ray

    from cerbero_ray.inference.batch import chat_prompt
    from cerbero_ray.inference.continuous import ContinuousBatcher
    from cerbero_ray.models import load_for_inference

    ds = ray.data.from_items([{"doc": i, "prompt": t} for i, t in enumerate(TEXTS)])
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    rows = sorted(generate_dataset(ds, tiny_hf, sampling=greedy, batch_size=2).take_all(), key=lambda r: r["doc"])
    assert [r["error"] for r in rows] == [None, "empty", None, "no_text", None]
    model, tok = load_for_inference(tiny_hf)
    cb = ContinuousBatcher(model, tok, num_slots=4, max_new_tokens=6)
    expected = cb.generate([chat_prompt(tok, t) for t in TEXTS if t], Sampling(**greedy))
    got = [r for r in rows if r["error"] is None]
    assert [r["completion"] for r in got] == [e["text"] for e in expected]
    assert all(r["finish_reason"] in ("stop", "length") and r["new_tokens"] >= 1 for r in got)


def test_an_adapter_is_a_checkpoint_for_the_dataset_api(tiny_hf, tiny_adapters, ray_local):
    """A LoRA adapter folder where a checkpoint goes: the base it records, or the one given (its
    fingerprint checked); the answers are the adapter's, not the base's."""
    import ray

    from cerbero_ray.models import load_for_inference

    adapter = tiny_adapters["toxicity-it"]  # no tokenizer of its own: its base's is used
    ds = ray.data.from_items([{"doc": i, "prompt": t} for i, t in enumerate(TEXTS[:1])])
    greedy = {"max_new_tokens": 6, "temperature": 0.0}
    (row,) = generate_dataset(ds, adapter, sampling=greedy, batch_size=2).take_all()
    (given,) = generate_dataset(ds, adapter, sampling=greedy, batch_size=2, base=tiny_hf).take_all()
    from cerbero_ray.inference.batch import chat_prompt
    from cerbero_ray.inference.continuous import ContinuousBatcher

    def engine_text(checkpoint):  # the engine in this process (a third dataset would cost ~6 s here)
        model, tok = load_for_inference(checkpoint)
        engine = ContinuousBatcher(model, tok, num_slots=2, max_new_tokens=6)
        return engine.generate([chat_prompt(tok, TEXTS[0])], Sampling(**greedy))[0]["text"]

    assert row["completion"] == given["completion"] == engine_text(adapter) != engine_text(tiny_hf)


def test_bad_arguments_are_named(tiny_hf, ray_local):
    import ray

    ds = ray.data.from_items([{"body": "x"}])
    with pytest.raises(ValueError, match="text_column 'text'"):
        label_dataset(ds, tiny_hf, "sentiment")
    with pytest.raises(ValueError, match="prompt_column 'prompt'"):
        generate_dataset(ds, tiny_hf)
    with pytest.raises(ValueError, match="not a shipped task"):
        label_dataset(ds, tiny_hf, "nonexistent", text_column="body")
    # sampling settings are checked before any actor starts, naming the setting
    with pytest.raises(ValueError, match=r"sampling.frequency_penalty must be in \[-2, 2\]"):
        generate_dataset(ds, tiny_hf, prompt_column="body", sampling={"frequency_penalty": 3})
    with pytest.raises(ValueError, match="sampling: .*'temprature'"):
        generate_dataset(ds, tiny_hf, prompt_column="body", sampling={"temprature": 0})
