"""The data stage's schema and its config-time checks."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from cerbero_ray.config.common import (
    ClusterConfig,
    PathsConfig,
    TokenizerConfig,
    at_least,
    check_apart,
    check_local_path,
    check_output_dir,
    check_tokenizer,
    one_of,
)
from cerbero_ray.storage import is_local, local_path

SOURCE_FORMATS = ("auto", "openai", "sharegpt", "alpaca", "text")


@dataclass
class SourceConfig:
    path: str = MISSING  # file, folder, glob or URI
    format: str = "auto"  # auto | openai | sharegpt | alpaca | text
    weight: float = 1.0  # 2.0 = every document twice, 0.5 = half of them (seeded)
    text_field: str = "text"


@dataclass
class DecontaminateConfig:
    # evaluation files (JSON, JSONL, CSV/TSV, text; local or URIs): a training document sharing a run
    # of `ngram` words with any of their texts, or holding a text of `min_words` to `ngram - 1` words
    # whole, is dropped (cerbero_ray/data/decontaminate.py)
    paths: List[str] = field(default_factory=list)
    ngram: int = 13
    min_words: int = 8


@dataclass
class DataConfig:
    # name -> a SourceConfig's keys. Not typed as Dict[str, SourceConfig]: Hydra could then not add a
    # source from the command line (+data.sources.NAME.path=…); check_data checks every key instead
    sources: Dict[str, Any] = field(default_factory=dict)
    seq_len: int = 8192
    loss_on: str = "assistant"  # assistant | all
    packing: str = "whole"  # whole (best-fit decreasing) | split (fill every row)
    long_docs: str = "split"  # split | drop  (documents longer than seq_len)
    dedup: str = "exact"  # none | exact | near: rows repeating an earlier one dropped (cerbero_ray/data/dedup.py)
    decontaminate: DecontaminateConfig = field(default_factory=DecontaminateConfig)
    buffer_docs: int = 4096  # documents per packing buffer (= per shard)
    workers: Optional[int] = None  # packing actors; None = cluster CPUs - 1 (one CPU left for reads)
    seed: int = 0
    compression: str = "zstd"
    output_dir: str = MISSING
    overwrite: bool = False


@dataclass
class DataStageConfig:
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)


EVAL_MAX_BYTES = 1 << 30  # an evaluation file's size at most: the dedup pass holds all its texts' runs in memory


def check_eval_size(i: int, path: str, size: int) -> None:
    """``ValueError`` naming ``data.decontaminate.paths[i]`` when the file is over :data:`EVAL_MAX_BYTES`:
    a test set is megabytes; a file this large is a training corpus named by mistake, whose every
    run of words would be held in the driver's memory."""
    if size > EVAL_MAX_BYTES:
        raise ValueError(
            f"data.decontaminate.paths[{i}]: {path} is {size / 2**30:.1f} GiB, over the {EVAL_MAX_BYTES / 2**30:g} GiB "
            "an evaluation set may be (test sets are megabytes: is it a training file?)"
        )


def check_data(c: DataStageConfig, before: frozenset = frozenset()) -> None:
    """``ValueError`` naming the key for a bad data config (the sources' files are checked at run time)."""
    d = c.data
    check_tokenizer(c.tokenizer)
    check_output_dir(d.output_dir, "data.output_dir")
    if int(d.seq_len) < 16:
        raise ValueError(f"data.seq_len must be >= 16, got {d.seq_len}")
    at_least(d, ("buffer_docs", "workers"), 1, "data")
    at_least(d, ("seed",), 0, "data")  # numpy's generators take no negative seed
    one_of(d.loss_on, ("assistant", "all"), "data.loss_on")
    one_of(d.packing, ("whole", "split"), "data.packing")
    one_of(d.long_docs, ("split", "drop"), "data.long_docs")
    one_of(d.dedup, ("none", "exact", "near"), "data.dedup")
    dc = d.decontaminate
    if not isinstance(dc.ngram, int) or dc.ngram < 5:  # shorter runs of words are common Italian, not a test item
        raise ValueError(f"data.decontaminate.ngram must be an integer >= 5, got {dc.ngram!r}")
    if not isinstance(dc.min_words, int) or not 5 <= dc.min_words <= dc.ngram:
        raise ValueError(
            f"data.decontaminate.min_words must be an integer from 5 to data.decontaminate.ngram ({dc.ngram}), "
            f"got {dc.min_words!r}"
        )
    for i, path in enumerate(dc.paths):
        if not isinstance(path, str) or not path:
            raise ValueError(f"data.decontaminate.paths[{i}] must be a file path or URI, got {path!r}")
        check_local_path(path, f"data.decontaminate.paths[{i}]")
        if is_local(path) and os.path.isdir(local_path(path)):
            raise ValueError(f"data.decontaminate.paths[{i}]: {path} is a folder; name the evaluation files in it")
        if is_local(path) and os.path.isfile(local_path(path)):
            check_eval_size(i, path, os.path.getsize(local_path(path)))
    if not d.sources:
        raise ValueError("data.sources: no source (add one: +data.sources.NAME.path=...)")
    defaults = {k: v for k, v in asdict(SourceConfig()).items() if k != "path"}
    for name, s in list(d.sources.items()):
        key = f"data.sources.{name}"
        s = asdict(s) if isinstance(s, SourceConfig) else s
        if not isinstance(s, dict):
            raise ValueError(f"{key} must be a mapping of {sorted(['path', *defaults])}, got {s!r}")
        unknown = set(s) - {"path", *defaults}
        if unknown:
            raise ValueError(f"{key}: unknown key(s) {sorted(unknown)}; allowed {sorted(['path', *defaults])}")
        if not isinstance(s.get("path"), str) or not s["path"]:
            raise ValueError(f"{key}.path is required (a file, folder, glob or URI)")
        s = SourceConfig(**{**defaults, **s})
        check_apart(s.path, d.output_dir, f"{key}.path", "data.output_dir", ("shards", "rejects"))
        one_of(s.format, SOURCE_FORMATS, f"{key}.format")
        if not isinstance(s.weight, (int, float)) or not s.weight > 0:
            raise ValueError(f"{key}.weight must be a number > 0, got {s.weight!r}")
        if not isinstance(s.text_field, str):
            raise ValueError(f"{key}.text_field must be a string, got {s.text_field!r}")
        check_local_path(s.path, f"{key}.path", glob_ok=True)  # before Ray starts, naming the key
        d.sources[name] = s  # typed from here on
