"""The input files a stage reads (data, label, generate): which files of a path are read and which
are skipped (each with why, for the run's summary or manifest), and their bytes as text.

- **Formats** by name: ``.jsonl``, ``.json``, ``.parquet``, ``.txt``, each optionally compressed
  (``.gz``, ``.zst``/``.zstd``, ``.bz2``). In a folder, any other file (``.csv``, ``.md``…) and a
  name starting with ``.`` or ``_`` (``_SUCCESS``, ``.DS_Store``) is skipped and listed, never
  silently dropped.
- **Compression** by the file's first bytes (gzip, zstd, bzip2), whatever its name says: a gzip
  file named ``.jsonl`` is decompressed, never read as text.
- **Encodings**: UTF-8 (a byte-order mark at the start is dropped); a file that starts with a
  UTF-16 or UTF-32 byte-order mark is decoded from it.
"""

from __future__ import annotations

import codecs
import fnmatch
import posixpath

import pyarrow as pa
import pyarrow.fs as pafs

from cerbero_ray import storage

FORMAT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
COMPRESSION_SUFFIXES = {".gz": "gzip", ".gzip": "gzip", ".zst": "zstd", ".zstd": "zstd", ".bz2": "bz2"}
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"BZh", "bz2"))
# longest first: a UTF-32 little-endian mark starts with the UTF-16 one
WIDE_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def format_suffix(path: str) -> str:
    """The format part of a name: ``.jsonl`` for ``a.jsonl.gz``, ``.csv`` for ``a.csv``, ``""`` for none."""
    base = posixpath.basename(path)
    stem, ext = posixpath.splitext(base)
    if ext.lower() in COMPRESSION_SUFFIXES:
        stem, ext = posixpath.splitext(stem)
    return ext.lower()


def list_inputs(path: str, suffixes: tuple[str, ...] = FORMAT_SUFFIXES) -> tuple[list[str], list[dict]]:
    """(files read, files skipped as ``{"path", "reason"}``) under ``path``: a file (always read: it
    was named), a folder (recursively) or a glob in its last part; sorted, full paths or URIs.
    ``suffixes`` empty: every file of the folder that is not hidden is read."""
    fs, p = storage.resolve(path)
    prefix = path[: len(path) - len(p)] if storage.is_uri(path) else ""
    pattern = None
    if any(c in posixpath.basename(p) for c in "*?["):
        p, pattern = posixpath.dirname(p), posixpath.basename(p)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {path}")
    if info.type == pafs.FileType.File:
        return [path], []
    files, skipped = [], []
    for i in sorted(fs.get_file_info(pafs.FileSelector(p, recursive=True)), key=lambda i: i.path):
        name = posixpath.basename(i.path)
        if i.type != pafs.FileType.File or (pattern is not None and not fnmatch.fnmatch(name, pattern)):
            continue
        full = prefix + i.path if prefix and not i.path.startswith(prefix) else i.path
        hidden = any(part.startswith((".", "_")) for part in posixpath.relpath(i.path, p).split("/"))
        if hidden:
            skipped.append({"path": full, "reason": "hidden name (starts with '.' or '_')"})
        elif suffixes and format_suffix(name) not in suffixes:
            skipped.append({"path": full, "reason": f"not an input format ({format_suffix(name) or 'no suffix'})"})
        else:
            files.append(full)
    if not files:
        why = f" ({len(skipped)} skipped: {skipped[0]['path']}: {skipped[0]['reason']}…)" if skipped else ""
        raise FileNotFoundError(f"no input files{' ' + str(suffixes) if suffixes else ''} under {path}{why}")
    return files, skipped


def sniff(head: bytes) -> str | None:
    """The compression a file's first bytes announce, or None."""
    return next((codec for magic, codec in MAGIC if head.startswith(magic)), None)


def compression(path: str) -> str | None:
    fs, p = storage.resolve(path)
    with fs.open_input_file(p) as f:  # as stored (open_input_stream would decompress by the name)
        return sniff(f.read(4))


def open_stream(path: str):
    """A file's bytes as a stream, decompressed when its first bytes say it is compressed."""
    fs, p = storage.resolve(path)
    return decompressed(fs.open_input_file(p))


def decompressed(f):
    """``f`` (a seekable pyarrow file), or a decompressing stream over it when it is compressed."""
    head = f.read(4)
    f.seek(0)
    codec = sniff(head)
    return pa.CompressedInputStream(f, codec) if codec else f


def to_utf8(data: bytes) -> bytes:
    """A file's bytes as UTF-8: a UTF-8 byte-order mark dropped, UTF-16/32 (by their mark) decoded.
    Bytes that are no valid UTF-8 stay as they are (their rows become rejects or error rows)."""
    for bom, codec in WIDE_BOMS:
        if data.startswith(bom):
            return data.decode(codec, errors="replace").encode("utf-8")
    return storage.strip_bom(data)


def is_wide(head: bytes) -> bool:
    """Whether a file starting with ``head`` is UTF-16 or UTF-32 (by its byte-order mark)."""
    return any(head.startswith(bom) for bom, _ in WIDE_BOMS)


def describe_skipped(skipped: list[dict], limit: int = 5) -> str:
    """One console line's worth: ``3 file(s) skipped: a.csv (not an input format (.csv)), …``."""
    shown = ", ".join(f"{posixpath.basename(s['path'])} ({s['reason']})" for s in skipped[:limit])
    more = f" and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return f"{len(skipped)} file(s) skipped: {shown}{more}"
