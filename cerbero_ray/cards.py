"""What the cards of a trained model folder (:mod:`cerbero_ray.train.card`) and of an export folder
(:mod:`cerbero_ray.export.card`) share: the Hub's metadata block, written by
``huggingface_hub.ModelCardData`` (the form the Hub parses), the chat-format and usage sections, and
the training data's checks: rows for the reader and, in the metadata (:data:`RECORD`), the record the
evaluate stage reads back, so that a folder copied out of its run (to a bucket, to the Hub) still
says which evaluation sets its data was checked against."""

from __future__ import annotations

import os

CARD = "README.md"  # a model folder's card: where the Hub reads it
RECORD = "cerbero_ray"  # the card metadata's key for what the run knew of its data: it travels with the folder
_COUNTS = ("documents", "duplicates", "near_duplicates", "contaminated", "ngram", "min_words")  # its integers
GGUF_KEY = "cerbero_ray.data"  # the same record in a GGUF file's own metadata (JSON): it travels with the file


def write_card(directory: str, card: str | None) -> None:
    """``card`` as the card of the local folder ``directory`` (nothing when None)."""
    if card is not None:
        with open(os.path.join(directory, CARD), "w") as f:
            f.write(card)


def front_matter(**meta) -> list[str]:
    """The card's first lines: its metadata (``ModelCardData``'s fields; None ones left out)."""
    from huggingface_hub import ModelCardData

    return ["---", ModelCardData(**meta).to_yaml(), "---", ""]


def chat_and_use(intro: str, prompt: str, code: list[str]) -> list[str]:
    """The "Chat format" section (``intro``, then ``prompt`` as the template writes it) and the
    "Use" section (``code``, Python that loads the model and answers)."""
    said = [intro, ""] if intro else []
    chat = ["## Chat format", "", *said, "```", prompt.rstrip("\n"), "```", ""]
    return [*chat, "## Use", "", "```python", *code, "```", ""]


def data_checks(dedup: dict | None) -> list[str]:
    """The data stage's deduplication and decontamination, as card rows (none for a manifest from
    before them): whether the data was checked against evaluation sets is what makes a benchmark
    figure of this model mean something."""
    if not dedup:
        return []
    mode = dedup.get("mode", "none")
    if mode == "none":
        rows = ["| deduplication | none (`data.dedup=none`) |"]
    else:
        near = f" and {dedup.get('near_duplicates', 0):,} near" if mode == "near" else ""
        rows = [
            f"| deduplication | `{mode}`: {dedup.get('duplicates', 0):,} exact{near} duplicate(s) of "
            f"{dedup.get('documents', 0):,} documents dropped |"
        ]
    sets = dedup.get("evaluation_sets") or {}
    if not sets:
        return [*rows, "| decontamination | none: the data was not checked against any evaluation set |"]
    n, whole = dedup.get("ngram", 13), dedup.get("min_words", dedup.get("ngram", 13))
    names = _names(sets)
    named = ", ".join(f"`{names[p]}` ({k:,} dropped)" for p, k in sets.items())
    how = f"a {n}-word passage" + (f" or a whole text of {whole}+ words" if whole < n else "")
    return [*rows, f"| decontamination | checked against {named}: a document sharing {how} with one is dropped |"]


def _names(paths) -> dict[str, str]:
    """Each path (local or a URI) by its file's name; two files of one name with as many of their
    folders as tell them apart. A name given again is itself (a record's names read back)."""
    parts = {p: p.rstrip("/").split("/") for p in paths}
    names = {}
    for depth in range(1, max((len(x) for x in parts.values()), default=1) + 1):
        names = {p: "/".join(x[-depth:]) for p, x in parts.items()}
        if len(set(names.values())) == len(names):
            break
    return names


def data_record(dedup: dict | None) -> dict | None:
    """The card metadata's :data:`RECORD` for a model trained on data with the data stage's dedup
    block ``dedup`` (its manifest's): the checks, each evaluation file by its name (a card gets
    published: no folder or bucket of the user's in it; two files of one name, with as many of
    their folders as tell them apart) with its contents' hash and the documents it cost; None
    without a block."""
    if not dedup:
        return None
    sets, hashes = dedup.get("evaluation_sets") or {}, dedup.get("evaluation_sha256") or {}
    names = _names(sets)
    out = {k: dedup[k] for k in ("mode", *_COUNTS) if k in dedup}
    out["evaluation_sets"] = {names[p]: n for p, n in sets.items()}
    if hashes:
        out["evaluation_sha256"] = {names[p]: hashes[p] for p in sets if p in hashes}
    return {"data": {"dedup": out}}


def card_metadata(folder: str) -> dict:
    """The metadata of the card in ``folder`` (local or a URI); {} when there is none or it does not
    parse."""
    from cerbero_ray import storage

    path = storage.join(folder, CARD)
    try:
        if not storage.is_file(path):
            return {}
        from huggingface_hub import ModelCard

        fs, p = storage.resolve(path)
        with fs.open_input_stream(p, compression=None) as f:
            text = f.read().decode("utf-8", "replace")
        if not text.lstrip("\ufeff \t\r\n").startswith("---"):  # no metadata block (a README, not a card)
            return {}
        return ModelCard(text).data.to_dict()
    except Exception:  # a card that does not parse says nothing
        return {}


def readable_data(data) -> dict | None:
    """``data`` when it has the shape results.md and the cards read (``dedup``: None, or a dict whose
    counts are integers, ``evaluation_sets`` mapping names to counts and ``evaluation_sha256`` names
    to hashes), else None: a card's metadata is anyone's to edit."""
    if not isinstance(data, dict):
        return None
    dedup = data.get("dedup")
    if dedup is None:
        return data
    if not isinstance(dedup, dict):
        return None
    sets, hashes = dedup.get("evaluation_sets") or {}, dedup.get("evaluation_sha256") or {}
    if not isinstance(sets, dict) or not isinstance(hashes, dict):
        return None
    if not isinstance(dedup.get("mode", ""), str) or any(type(dedup.get(k, 0)) is not int for k in _COUNTS):
        return None
    counts = all(isinstance(k, str) and type(v) is int for k, v in sets.items())
    return data if counts and all(isinstance(k, str) and isinstance(v, str) for k, v in hashes.items()) else None


def data_of(metadata: dict) -> dict | None:
    """The :data:`RECORD`'s ``data`` of a card's metadata (:func:`card_metadata`) when it is one
    (:func:`readable_data`), else None."""
    record = metadata.get(RECORD)
    return readable_data(record.get("data")) if isinstance(record, dict) else None


_GGUF_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # value type -> bytes
_GGUF_READS = (1 << 20, 1 << 23, 1 << 26)  # how much of the file is read: its metadata only (our writer puts the
# record before the vocabulary; llama.cpp's quantizer moves it after, so a large vocabulary takes a second read)


class _Short(Exception):
    """The metadata goes on past the bytes read."""


def gguf_data(path: str) -> dict | None:
    """The training data's record (:data:`GGUF_KEY`) in the metadata of the GGUF file at ``path``
    (local or a URI: its metadata is read, never the weights) when it has a readable one
    (:func:`readable_data`), else None."""
    from cerbero_ray import storage

    try:
        fs, p = storage.resolve(path)
        with fs.open_input_file(p) as f:
            for size in _GGUF_READS:
                head = f.read_at(size, 0)
                try:
                    return _gguf_record(head)
                except _Short:
                    if len(head) < size:  # the file ends first: not a whole GGUF file
                        return None
    except (OSError, ValueError, KeyError, RecursionError):
        return None  # not a GGUF file, or a record results.md cannot read
    return None  # metadata over 64 MiB: not ours


def _gguf_record(head: bytes) -> dict | None:
    """:func:`gguf_data` of a file's first bytes ``head``; :class:`_Short` when its metadata goes on
    past them."""
    import json
    import struct

    def unpack(fmt: str, at: int) -> tuple:
        if at + struct.calcsize(fmt) > len(head):
            raise _Short
        return struct.unpack_from(fmt, head, at)

    def string(at: int) -> tuple[bytes, int]:
        (n,) = unpack("<Q", at)
        if at + 8 + n > len(head):
            raise _Short
        return head[at + 8 : at + 8 + n], at + 8 + n

    if head[:4] != b"GGUF" or unpack("<I", 4)[0] not in (2, 3):
        return None
    (kvs,), at = unpack("<Q", 16), 24
    for _ in range(kvs):
        key, at = string(at)
        (kind,), at = unpack("<I", at), at + 4
        if kind == 8:
            value, at = string(at)
            if key == GGUF_KEY.encode():
                return readable_data(json.loads(value))
        elif kind == 9:  # an array: its items' type, their count, the items
            (item, count), at = unpack("<IQ", at), at + 12
            if item != 8:
                at += count * _GGUF_SCALARS[item]
            for _ in range(count if item == 8 else 0):  # each string reads its length: past the head, _Short
                at = string(at)[1]
        else:
            at += _GGUF_SCALARS[kind]
        if at > len(head):
            raise _Short
    return None
