"""Batch generation on Ray Data: ``run_generate(cfg)``, two modes.

- ``prompts``: one answer per input text, the text as the human's turn of a cerbero chat. Output
  parts: ``id, prompt, completion, finish_reason, prompt_tokens, new_tokens, truncated, error, model``.
- ``self_chat``: each input text is a seed (a question or a topic); the model plays both sides for
  ``self_chat.turns`` exchanges (:mod:`cerbero_ray.generate.selfchat`). Parts hold the conversations;
  at the end the driver drops near-duplicates across the run and writes ``conversations.jsonl`` in
  the data stage's ``openai`` format (``python jobs/data.py data.sources.chat.path=…``).

Same design as labeling (:mod:`cerbero_ray.batchjob`): chunks, a model actor pool, atomic parts,
a rerun does only the missing chunks. Sampling is seeded per chunk, so a rerun regenerates a
missing chunk exactly as the first run would have.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import asdict, is_dataclass, replace

import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import DictConfig

from cerbero_ray import batchjob, storage
from cerbero_ray.checkpoints import check_checkpoint, check_inference, vocab_size
from cerbero_ray.config import check
from cerbero_ray.config.constraint import config_grammar, plain
from cerbero_ray.config.generate import GenerateConfig, GenerateStageConfig
from cerbero_ray.config.sampling import check_token_ids
from cerbero_ray.inference.batch import generate_columns
from cerbero_ray.models import load_for_inference

log = logging.getLogger(__name__)


def engine_config(gc: GenerateConfig):
    """The generation engine of a ``generate`` config section."""
    from cerbero_ray.inference.engines import EngineConfig

    longest = max(gc.sampling.max_new_tokens, gc.self_chat.user_max_new_tokens)
    return EngineConfig(gc.engine, gc.batch_size, gc.max_prompt_tokens, longest)


class GenerateWorker(batchjob.ChunkWorker):
    """A Ray Data actor: one model, one chunk per call."""

    def __init__(self, gc: GenerateConfig):
        from cerbero_ray.inference.engines import build_engine

        self.gc = gc
        model, self.tok = load_for_inference(gc.checkpoint, gc.dtype, gc.base)
        self.model, self._embedder = model, None
        self.gen = build_engine(model, self.tok, engine_config(gc))
        # the answers' and the human turns' grammars (None: free text), checked at compose time
        self.sampling = replace(gc.sampling, grammar=config_grammar(gc.constraint, "generate.constraint"))
        self.user_grammar = config_grammar(gc.user_constraint, "generate.user_constraint")

    def process(self, chunk: batchjob.Chunk) -> dict:
        gc = self.gc
        rows = batchjob.read_chunk(chunk, gc.format, gc.text_field, gc.id_field)
        good = [r for r in rows if r["error"] is None]
        seed = gc.sampling.seed * 1_000_003 + chunk.start  # per chunk: a rerun redoes it identically
        self.gen.forget()  # and so does the engine: no prefix reused from the chunks before
        if gc.mode == "prompts":
            table, counts = self._prompts(rows, good, seed)
        else:
            table, counts = self._self_chat(rows, good, seed)
        batchjob.write_part(gc.output_dir, chunk, table)
        return {"rows": len(rows), "counts": json.dumps(counts)}

    def _prompts(self, rows, good, seed):
        cols = generate_columns(
            self.gen,
            self.tok,
            [r["text"] for r in rows],
            self.sampling,
            seed,
            [r["error"] for r in rows],
        )
        table = pa.table(
            {
                "id": [r["id"] for r in rows],
                "prompt": [r["text"] for r in rows],
                **cols,
                "model": [self.gc.checkpoint] * len(rows),
            },
            schema=PROMPT_SCHEMA,
        )
        return table, Counter(x or "error" for x in cols["finish_reason"])

    def _self_chat(self, rows, good, seed):
        from cerbero_ray.generate.selfchat import self_chat

        sc, s = self.gc.self_chat, self.sampling
        convs, reasons = self_chat(
            self.gen,
            [r["text"] for r in good],
            turns=sc.turns,
            sampling=s,
            user_sampling=replace(s, max_new_tokens=sc.user_max_new_tokens, grammar=self.user_grammar),
            assistant_tag=sc.assistant_tag,
            min_chars=sc.min_chars,
            max_repeat=sc.max_repeat_ratio,
            drop_unfinished=sc.drop_unfinished,
            seed=seed,
        )
        kept = [c for c in convs if c]
        vectors = (
            [v.astype("float16").tobytes() for v in self._embed([conversation_text(c) for c in kept])]
            if sc.dedup == "embedding"
            else [None] * len(kept)
        )
        it, vec = iter(convs), iter(vectors)
        out = []
        for r in rows:
            c = next(it) if r["error"] is None else None
            out.append(
                {
                    "id": r["id"],
                    "seed": r["text"],
                    "messages": json.dumps(c, ensure_ascii=False) if c else None,
                    "turns": len(c) // 2 if c else 0,
                    "error": r["error"],
                    "model": self.gc.checkpoint,
                    "embedding": next(vec) if c else None,
                }
            )
        return pa.Table.from_pylist(out, schema=CHAT_SCHEMA), reasons

    def _embed(self, texts: list[str]):
        """Each conversation's embedding for ``dedup=embedding``: computed here, where the model
        (and the GPU) is, and kept in the part, so the driver only compares vectors."""
        import contextlib

        from cerbero_ray.generate.dedup import embed

        sc = self.gc.self_chat
        if self._embedder is None:
            if sc.dedup_model:
                from transformers import AutoModel, AutoTokenizer

                from cerbero_ray.storage import local_copy

                path = local_copy(sc.dedup_model)
                enc = AutoModel.from_pretrained(path, dtype=self.model.dtype).eval().to(self.model.device)
                self._embedder = (enc, AutoTokenizer.from_pretrained(path))
            else:
                self._embedder = (self.model.model, self.tok)  # the causal LM's body: its final hidden states
        model, tok = self._embedder
        with getattr(self.gen, "lock", contextlib.nullcontext()):  # the continuous engine's loop shares the model
            return embed(model, tok, texts, max_tokens=sc.dedup_max_tokens)


PROMPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int64()),
        ("new_tokens", pa.int64()),
        ("truncated", pa.bool_()),
        ("error", pa.string()),
        ("model", pa.string()),
    ]
)
CHAT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("seed", pa.string()),
        ("messages", pa.string()),
        ("turns", pa.int64()),
        ("error", pa.string()),
        ("model", pa.string()),
        ("embedding", pa.binary()),
    ]
)  # float16 vector, with self_chat.dedup=embedding


def conversation_text(messages: list[dict]) -> str:
    """What near-duplicate detection compares: every turn's text, in order."""
    return " ".join(m["content"] for m in messages)


RUN_FILE = batchjob.RUN_FILES["generate"]
CONVERSATIONS = "conversations.jsonl"  # self-chat's conversations, the data stage's input


def precheck(c: GenerateStageConfig, before: frozenset = frozenset()) -> None:
    """The stage table's precheck: an output folder holding another generation run (other settings,
    the checkpoint written again since) is refused before Ray starts."""
    batchjob.precheck_output("generate", c.generate, RUN_FILE, lambda: run_identity(c.generate), before)


def run_identity(gc: GenerateConfig) -> dict:
    """What fixes a generation run's output: another run into the same folder must match it (a
    constraint, the sampling penalties and logit bias only when set, so an earlier run's folder
    without them still matches)."""
    out = {
        k: asdict(v) if is_dataclass(v := getattr(gc, k)) else v
        for k in (
            "mode",
            "input",
            "text_field",
            "id_field",
            "checkpoint",
            "chunk_rows",
            "sampling",
            "self_chat",
            "max_prompt_tokens",
            "engine",
        )
    }
    # what the checkpoint holds now: one written again under the same path is another run
    out[batchjob.CHECKPOINT_VERSION] = [storage.version(x) for x in (gc.checkpoint, gc.base) if x]
    for k, off in (("frequency_penalty", 0), ("presence_penalty", 0), ("repetition_penalty", 1), ("logit_bias", {})):
        if out["sampling"][k] in (off, None):
            del out["sampling"][k]
    for k in ("constraint", "user_constraint"):
        c = getattr(gc, k)
        if c.kind is not None:
            out[k] = {"kind": c.kind, "value": plain(c.value)}
    return out


def finish_self_chat(gc: GenerateConfig, reasons: Counter) -> dict:
    """Drop near-duplicates across the run; write ``conversations.jsonl`` (the data stage's input)."""
    import numpy as np

    from cerbero_ray.generate.dedup import near_duplicates, near_duplicates_cosine

    out = gc.output_dir
    fs, p = storage.resolve(storage.join(out, "parts"))
    rows = [r for r in pq.read_table(p, filesystem=fs).to_pylist() if r["messages"]]
    rows.sort(key=lambda r: r["id"])
    convs = [json.loads(r["messages"]) for r in rows]
    sc = gc.self_chat
    if sc.dedup == "ngram":
        dup = near_duplicates([conversation_text(c) for c in convs], n=sc.dedup_ngram, threshold=sc.dedup_threshold)
    elif sc.dedup == "embedding":
        emb = np.stack([np.frombuffer(r["embedding"], dtype=np.float16) for r in rows]) if rows else np.zeros((0, 1))
        # a language model's own hidden states are centred (see near_duplicates_cosine); an encoder's are not
        dup = near_duplicates_cosine(emb, threshold=sc.dedup_cosine, center=not sc.dedup_model)
    else:
        dup = [None] * len(convs)
    kept = [(r, c) for r, c, d in zip(rows, convs, dup) if d is None]
    path = storage.join(out, CONVERSATIONS)
    lines = (
        json.dumps({"id": r["id"], "messages": c, "source": "self_chat", "model": r["model"]}, ensure_ascii=False)
        + "\n"
        for r, c in kept
    )
    storage.write_bytes(path, "".join(lines).encode())
    return {
        "conversations": len(kept),
        "near_duplicates": len(convs) - len(kept),
        "filtered": dict(reasons),
        "output": path,
    }


def run_generate(cfg: DictConfig | dict | GenerateStageConfig) -> dict:
    """Generate over ``generate.input`` on an initialised Ray; returns the summary (also ``summary.json``)."""
    c = check("generate", cfg)
    gc = c.generate
    check_inference(gc.checkpoint, gc.engine, "generate", gc.base)
    if gc.sampling.logit_bias and (vocab := vocab_size(gc.checkpoint, gc.base)) is not None:
        check_token_ids(gc.sampling.logit_bias, vocab, "generate.sampling.logit_bias", f"{gc.checkpoint}'s vocabulary")
    sc = gc.self_chat
    if gc.mode == "self_chat" and sc.dedup == "embedding" and sc.dedup_model:
        check_checkpoint(sc.dedup_model, "generate.self_chat.dedup_model")
    out = gc.output_dir
    chunks, todo, skipped = batchjob.start_run("generate", gc, RUN_FILE, run_identity(gc), (CONVERSATIONS,))
    log.info(
        f"[generate] {gc.mode}: {len(chunks)} chunks; {len(chunks) - len(todo)} already done, "
        f"{len(todo)} to go -> {out}",
    )
    counts, t0 = Counter(), time.perf_counter()
    if todo:
        for row in batchjob.map_chunks(todo, GenerateWorker, gc, "generate", f"generate {gc.mode}"):
            counts.update(json.loads(row["counts"]))
    summary = {
        "mode": gc.mode,
        "chunks_processed": len(todo),
        "chunks_skipped": len(chunks) - len(todo),
        "seconds": round(time.perf_counter() - t0, 2),
        "counts": dict(counts),
        "skipped_files": skipped,  # files of the input folder not read, with why
        "parts": storage.join(out, "parts"),
    }
    if gc.mode == "self_chat":
        summary.update(finish_self_chat(gc, counts))
        log.info(
            f"[generate] {summary['conversations']} conversations -> {summary['output']} "
            f"(near-duplicates dropped {summary['near_duplicates']}, filtered this run {summary['filtered']})",
        )
    else:
        log.info(f"[generate] finish reasons this run {dict(counts)} -> {summary['parts']}")
    storage.write_json(storage.join(out, "summary.json"), summary)
    return summary
