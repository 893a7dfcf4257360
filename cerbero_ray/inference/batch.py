"""Batch inference over rows: the per-batch functions the batch jobs run, and the same as
``ray.data.Dataset`` → ``ray.data.Dataset`` transforms for people who already hold their corpus in
Ray Data (in the manner of ``ray.data.llm``'s processors)::

    import ray
    from cerbero_ray.inference import label_dataset, generate_dataset

    ds = ray.data.read_json("corpus.jsonl")                       # a column "text"
    labeled = label_dataset(ds, "outputs/train/tiny-cpu/hf", "sentiment", concurrency=1)
    labeled.select_columns(["text", "label", "p_positive"]).show(3)
    answers = generate_dataset(ds, "outputs/train/tiny-cpu/hf", prompt_column="text",
                               sampling={"max_new_tokens": 32, "temperature": 0})

A row whose text is missing, not a string or empty gets an ``error`` and no label or completion;
it never stops the dataset. The per-batch functions import no Ray.
"""

from __future__ import annotations

from dataclasses import asdict

from cerbero_ray.config.label_task import LabelTask, get_task
from cerbero_ray.inference.sampling import Sampling, check_sampling


def text_error(text) -> str | None:
    """Why ``text`` cannot be used (``None`` when it can)."""
    if text is None:
        return "no_text"
    if not isinstance(text, str):
        return "text_not_a_string"
    if not text.strip():
        return "empty"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "invalid_unicode"  # a lone surrogate (valid in JSON): no tokenizer takes it
    return None


def label_columns(scorer, texts: list, errors: list[str | None] | None = None) -> dict[str, list]:
    """``label``, ``p_<label>`` for every label, ``truncated`` and ``error`` for each of ``texts``;
    rows with an error (given, or found here) are not scored."""
    errors = [e or text_error(t) for t, e in zip(texts, errors or [None] * len(texts))]
    scored = iter(scorer.score([t for t, e in zip(texts, errors) if e is None]))
    cols: dict[str, list] = {"label": [], **{f"p_{k}": [] for k in scorer.labels}, "truncated": [], "error": []}
    for e in errors:
        s = next(scored) if e is None else None
        if s is not None and s.get("error"):
            e, s = "too_long_for_window", None
        cols["label"].append(s["label"] if s else None)
        for k in scorer.labels:
            cols[f"p_{k}"].append(s["probs"][k] if s else None)
        cols["truncated"].append(bool(s and s["truncated"]))
        cols["error"].append(e)
    return cols


def chat_prompt(tok, text: str) -> str:
    """``text`` as the human's turn of a cerbero chat, ready for the assistant's answer."""
    return tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def generate_columns(
    engine, tok, texts: list, sampling: Sampling, seed: int | None, errors: list[str | None] | None = None
) -> dict[str, list]:
    """``completion``, ``finish_reason``, ``prompt_tokens``, ``new_tokens``, ``truncated``, ``error``
    for each text, each asked as the human's turn; ``engine`` is a ``ContinuousBatcher`` or a ``Generator``."""
    from cerbero_ray.tokenizer import text_tail

    errors = [e or text_error(t) for t, e in zip(texts, errors or [None] * len(texts))]
    # a prompt over the budget keeps its last tokens: only a huge text's end is tokenized
    budget = engine.max_prompt_tokens
    prompts = [chat_prompt(tok, text_tail(t, budget, tok)) for t, e in zip(texts, errors) if e is None]
    results = iter(engine.generate(prompts, sampling, seed=seed))
    keys = ("completion", "finish_reason", "prompt_tokens", "new_tokens")
    cols: dict[str, list] = {k: [] for k in (*keys, "truncated", "error")}
    for e in errors:
        g = next(results) if e is None else {}
        for k, v in zip(keys, (g.get("text"), g.get("finish_reason"), g.get("prompt_tokens"), g.get("new_tokens"))):
            cols[k].append(v)
        cols["truncated"].append(bool(g.get("truncated")))
        cols["error"].append(e)
    return cols


class Labeler:
    """One model and what a task needs of it: a label scorer (``classify``), or the continuous
    engine under the task's schema (``extract``, :class:`~cerbero_ray.inference.extract.Extractor`,
    ``slots`` answers at a time). What labels rows, whether they come from a stage's chunk
    (:mod:`cerbero_ray.label`) or a Ray Dataset's batch (:func:`label_dataset`)."""

    def __init__(
        self, checkpoint: str, task: LabelTask, dtype: str = "auto", base: str | None = None, slots: int = 16, **kw
    ):
        from cerbero_ray.inference.extract import Extractor, output_fields
        from cerbero_ray.inference.label_prompts import prompt_hash
        from cerbero_ray.inference.scorer import Scorer
        from cerbero_ray.models import load_for_inference

        model, tok = load_for_inference(checkpoint, dtype, base)
        self.task, self.fields = task, output_fields(task)  # the columns between id and truncated
        if task.kind == "extract":
            self.scorer = None
            self.extractor = Extractor(model, tok, task, max_text_tokens=kw.get("max_text_tokens", 512), slots=slots)
        else:
            self.scorer, self.extractor = Scorer(model, tok, task, **kw), None
        self.prompt_hash = prompt_hash(task, tok)

    def columns(self, texts: list, errors: list[str | None] | None = None) -> dict[str, list]:
        if self.extractor is None:
            return label_columns(self.scorer, texts, errors)
        errors = [e or text_error(t) for t, e in zip(texts, errors or [None] * len(texts))]
        return self.extractor.columns(texts, errors)


class _Labeler:
    """A Ray Data actor for :func:`label_dataset`."""

    def __init__(self, checkpoint: str, task: dict, column: str, dtype: str, scorer_kw: dict, base: str | None):
        self.labeler, self.column = Labeler(checkpoint, LabelTask(**task), dtype, base, **scorer_kw), column

    def __call__(self, batch: dict) -> dict:
        texts = [None if t is None else str(t) if not isinstance(t, str) else t for t in batch[self.column].tolist()]
        return {**batch, **self.labeler.columns(texts)}


class _Generator:
    """A Ray Data actor for :func:`generate_dataset`: one model, the continuous-batching engine."""

    def __init__(
        self,
        checkpoint: str,
        column: str,
        dtype: str,
        sampling: dict,
        batch_size: int,
        max_prompt_tokens: int,
        base: str | None = None,
    ):
        from cerbero_ray.inference.engines import EngineConfig, build_engine
        from cerbero_ray.models import load_for_inference

        model, self.tok = load_for_inference(checkpoint, dtype, base)
        self.sampling, self.column, self.calls = Sampling(**sampling), column, 0
        cfg = EngineConfig("continuous", batch_size, max_prompt_tokens, self.sampling.max_new_tokens)
        self.engine = build_engine(model, self.tok, cfg)

    def __call__(self, batch: dict) -> dict:
        seed = None if self.sampling.seed is None else self.sampling.seed * 1_000_003 + self.calls
        self.calls += 1
        self.engine.forget()  # a batch's prefixes are its own, as its seed
        texts = batch[self.column].tolist()
        return {**batch, **generate_columns(self.engine, self.tok, texts, self.sampling, seed)}


def _compute(concurrency: int, num_gpus: float, num_cpus: float) -> dict:
    return {"concurrency": concurrency, "num_gpus": num_gpus or None, "num_cpus": num_cpus}


def label_dataset(
    ds,
    checkpoint: str,
    task,
    *,
    text_column: str = "text",
    batch_size: int = 64,
    concurrency: int = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    dtype: str = "auto",
    max_text_tokens: int = 512,
    max_batch_tokens: int = 16384,
    base: str | None = None,
):
    """``ds`` with ``label``, ``p_<label>`` per label, ``truncated`` and ``error`` added, scored by
    ``checkpoint`` (an HF folder or URI, or a LoRA adapter folder on its recorded ``base``, or the
    one given) for ``task`` (a shipped task's name, a YAML file, a dict or a :class:`LabelTask`; an
    ``extract`` task adds a typed column per schema property, ``json`` and ``new_tokens`` instead of
    the labels). ``concurrency`` model actors, each with ``num_gpus`` GPUs."""
    t = get_task(task)
    if text_column not in ds.schema().names:
        raise ValueError(f"text_column {text_column!r} is not a column of the dataset ({ds.schema().names})")
    kw = {"max_text_tokens": max_text_tokens, "max_batch_tokens": max_batch_tokens, "sort_window": batch_size}
    return ds.map_batches(
        _Labeler,
        fn_constructor_args=(checkpoint, t.keys(), text_column, dtype, kw, base),
        batch_size=batch_size,
        batch_format="numpy",
        **_compute(concurrency, num_gpus, num_cpus),
    )


def generate_dataset(
    ds,
    checkpoint: str,
    *,
    prompt_column: str = "prompt",
    sampling: dict | Sampling | None = None,
    batch_size: int = 16,
    concurrency: int = 1,
    num_gpus: float = 0,
    num_cpus: float = 1,
    dtype: str = "auto",
    max_prompt_tokens: int = 2048,
    base: str | None = None,
):
    """``ds`` with ``completion``, ``finish_reason``, ``prompt_tokens``, ``new_tokens``, ``truncated``
    and ``error`` added: each row's ``prompt_column`` asked as the human's turn of a cerbero chat,
    answered by ``checkpoint`` on the continuous-batching engine (``batch_size`` slots per actor)."""
    try:
        s = sampling if isinstance(sampling, Sampling) else Sampling(**(sampling or {}))
    except TypeError as e:  # an unknown setting
        raise ValueError(
            f"sampling: {e} (the settings are Sampling's: {list(Sampling.__dataclass_fields__)})"
        ) from None
    check_sampling(s, "sampling")
    if prompt_column not in ds.schema().names:
        raise ValueError(f"prompt_column {prompt_column!r} is not a column of the dataset ({ds.schema().names})")
    args = (checkpoint, prompt_column, dtype, asdict(s), batch_size, max_prompt_tokens, base)
    return ds.map_batches(
        _Generator,
        fn_constructor_args=args,
        batch_size=batch_size * 4,
        batch_format="numpy",
        **_compute(concurrency, num_gpus, num_cpus),
    )
