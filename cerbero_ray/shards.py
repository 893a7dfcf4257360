"""The contract between the data stage and the trainer: packed Parquet shards and the manifest that
lists them. The data stage writes them (:mod:`cerbero_ray.data`), the trainer reads them
(:mod:`cerbero_ray.train`); neither imports the other, both import this.

Each shard row is one training sequence of exactly ``seq_len`` tokens: ``input_ids``, ``labels``
(:data:`IGNORE_INDEX` where no loss: masked turns, padding, each document's first token) and
``position_ids`` (restarting at 0 per document: how the trainer recovers document boundaries),
fixed-size int32 lists; ``num_docs``; per packed document ``doc_sources`` and ``doc_tokens``.
``manifest.json``, written last (a folder with one is a complete run), carries ``version``,
``seq_len``, ``tokenizer_hash``, ``config_hash``, the counts and ``shards`` (path and rows each).
"""

from __future__ import annotations

import posixpath

from cerbero_ray import storage

IGNORE_INDEX = -100  # a label position that carries no loss (PyTorch's cross-entropy default)
TRAIN_COLUMNS = ("input_ids", "labels", "position_ids")  # what the trainer reads of a shard
COLUMNS = (*TRAIN_COLUMNS, "num_docs")
MANIFEST = "manifest.json"
MANIFEST_VERSION = 1


def manifest_path(out: str) -> str:
    return storage.join(out, MANIFEST)


def write_manifest(manifest: dict, out: str) -> str:
    return storage.write_json(manifest_path(out), manifest, indent=2)


SHARDS = "shards"  # the folder of a data run's shards, beside its manifest


def read_manifest(out: str) -> dict:
    """The manifest of the data run in ``out``, its shards where they are now: beside it, in ``out``
    (:func:`shard_here`); ``FileNotFoundError`` when it has none."""
    m = storage.read_json(manifest_path(out))
    if isinstance(m, dict) and isinstance(m.get("shards"), list):
        for s in m["shards"]:
            if isinstance(s, dict) and isinstance(s.get("path"), str):
                s["path"] = shard_here(s["path"], out)
    return m


def shard_here(path: str, out: str) -> str:
    """A shard the manifest lists by the full path it was written to, as it is under ``out``, where
    the manifest is read now: a data folder copied whole (to a bucket for a cluster, to another
    machine) carries its shards beside its manifest, and the trainer reads those, never the
    folder it was copied from. A path not in a ``shards`` folder is kept as listed."""
    parent, name = posixpath.split(path)
    if posixpath.basename(parent) != SHARDS or not name:
        return path
    here = storage.join(out if storage.is_uri(out) else storage.resolve(out)[1], SHARDS, name)
    return path if storage.within(path, here) else here
