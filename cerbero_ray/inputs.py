"""The input files a stage reads (data, label, generate): which files of a path are read and which
are skipped (each with why, for the run's summary or manifest), and their bytes as text.

- **Formats** by name: ``.jsonl``, ``.json``, ``.parquet``, ``.txt``, each optionally compressed
  (``.gz``, ``.zst``/``.zstd``, ``.bz2``). In a folder, any other file (``.csv``, ``.md``…) and a
  name starting with ``.`` or ``_`` (``_SUCCESS``, ``.DS_Store``) is skipped and listed, never
  silently dropped.
- **Compression** by the file's first bytes (gzip, zstd, bzip2), whatever its name says: a gzip
  file named ``.jsonl`` is decompressed, never read as text. A gzip or bzip2 stream cut short or
  corrupt gives every byte before the break (it is fed to the decompressor 16 KiB at a time), then
  an error: the readers keep each complete line before it and make the break one error row.
- **Encodings**: UTF-8 (a byte-order mark at the start is dropped); a file that starts with a
  UTF-16 or UTF-32 byte-order mark is decoded from it.
"""

from __future__ import annotations

import bz2
import codecs
import hashlib
import json
import posixpath
import zlib

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


def list_inputs(
    path: str, suffixes: tuple[str, ...] = FORMAT_SUFFIXES, exclude: str | None = None
) -> tuple[list[str], list[dict]]:
    """(files read, files skipped as ``{"path", "reason"}``) under ``path``: a file (always read: it
    was named, unless it is empty), a folder (recursively; on a local disk symbolic links are
    followed, each real folder and file read once, a loop named once) or a glob, matched as a shell
    matches it (:func:`cerbero_ray.storage.glob_match`: ``corpus/*.jsonl`` is the folder's own
    files, never its subfolders'; ``corpus/**/*.jsonl`` every folder's); sorted, full paths or URIs.
    ``suffixes`` empty: every file of the folder that is not hidden is read. An empty file (0 bytes)
    is skipped and listed: it holds no row. The files of a folder that lie in the folder ``exclude``
    (the stage's output, inside its input) are skipped, the folder listed once: a rerun reads what
    the first run read, never the stage's own output."""
    fs, p = storage.resolve(path)
    prefix = path.split("://", 1)[0] + "://" if storage.is_uri(path) else ""  # a listed object's: scheme + its path
    p, pattern = storage.split_glob(p)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {path}")
    if info.type == pafs.FileType.File:
        if info.size == 0:
            return [], [{"path": path, "reason": "empty file (0 bytes)"}]
        return [path], []

    def walk(depth):  # (full name, size) of the files under the folder, and what it skipped
        return _walk(fs, p, prefix, depth) if prefix else _walk_local(p, depth)

    def rel(full):  # a listed file's path under the folder
        return posixpath.relpath(full[len(prefix) :] if prefix else full, p)

    depth = None if pattern is None or "**" in pattern.split("/") else pattern.count("/") + 1
    entries, skipped = walk(depth)
    if exclude is not None and not storage.within(exclude, prefix + p):
        exclude = None  # not in this folder: no file to test
    left_out = 0
    files = []
    for full, size in entries:
        name = posixpath.basename(full)
        under = rel(full)
        if pattern is not None and not storage.glob_match(under, pattern):
            continue
        if exclude is not None and storage.within(full, exclude):
            left_out += 1
        elif any(part.startswith((".", "_")) for part in under.split("/")):
            skipped.append({"path": full, "reason": "hidden name (starts with '.' or '_')"})
        elif suffixes and format_suffix(name) not in suffixes:
            skipped.append({"path": full, "reason": f"not an input format ({format_suffix(name) or 'no suffix'})"})
        elif size == 0:
            skipped.append({"path": full, "reason": "empty file (0 bytes)"})
        else:
            files.append(full)
    if left_out:  # one line for the folder, however many files the stage wrote there
        skipped.append({"path": exclude, "reason": f"the stage's output folder ({left_out} file(s)): never its input"})
    if not files:
        why = f" ({len(skipped)} skipped: {skipped[0]['path']}: {skipped[0]['reason']}…)" if skipped else ""
        if pattern is not None and depth is not None:  # what the glob would match a folder down or more
            rels = [rel(f) for f, _ in walk(None)[0]]
            n = sum(r.count("/") >= depth and storage.glob_match(r, f"**/{pattern}") for r in rels)
            if n:
                whole = storage.join(storage.split_glob(path)[0], "**", pattern)
                why += f" ({n} file(s) in its subfolders match {pattern!r}: a glob reads the folders it names"
                why += f"; {whole} reads them)"
        raise FileNotFoundError(f"no input files{' ' + str(suffixes) if suffixes else ''} under {path}{why}")
    return files, skipped


def stamp(files: list[str]) -> tuple[int, str]:
    """(bytes, stamp) of the listed ``files`` (one storage): their sizes together, and a hash of
    their names, sizes and modification times that changes when one is written again, added or
    removed; read from the listing, never from the files' contents."""
    if not files:
        return 0, hashlib.sha256(b"[]").hexdigest()[:16]
    fs, _ = storage.resolve(files[0])
    infos = _infos(fs, [storage.resolve(f)[1] for f in files], storage.is_uri(files[0]))
    blob = json.dumps([[f, i.size, i.mtime_ns] for f, i in zip(files, infos)])
    return sum(i.size for i in infos), hashlib.sha256(blob.encode()).hexdigest()[:16]


LIST_FROM = 8  # an object-store folder holding this many of the files is listed, not asked per object


def _infos(fs, paths: list[str], object_store: bool) -> list:
    """Each path's ``FileInfo``. In an object store a folder holding several of them is listed (a
    request per 1,000 keys) instead of a HEAD request per object: a corpus of 50,000 files took
    50,000 requests, one at a time, before a rerun could start (and again once it had)."""
    if not object_store:
        return fs.get_file_info(paths)
    folders: dict[str, list[str]] = {}
    for p in paths:
        folders.setdefault(posixpath.dirname(p), []).append(p)
    known = {}
    for folder, inside in folders.items():
        if len(inside) >= LIST_FROM:
            known.update(
                {i.path: i for i in fs.get_file_info(pafs.FileSelector(folder)) if i.type == pafs.FileType.File}
            )
    rest = [p for p in paths if p not in known]
    known.update(zip(rest, fs.get_file_info(rest) if rest else []))
    return [known[p] for p in paths]


def _walk(fs, p: str, prefix: str, depth: int | None = None) -> tuple[list[tuple[str, int]], list[dict]]:
    """(full name, size) of every file under ``p`` in an object store (no links there), sorted;
    only the folder's own files when ``depth`` is 1 (a listing, not a walk of the whole prefix)."""
    infos = sorted(fs.get_file_info(pafs.FileSelector(p, recursive=depth != 1)), key=lambda i: i.path)
    return [
        (prefix + i.path if not i.path.startswith(prefix) else i.path, i.size)
        for i in infos
        if i.type == pafs.FileType.File
    ], []


def _walk_local(p: str, depth: int | None = None) -> tuple[list[tuple[str, int]], list[dict]]:
    """(path, size) of every file under the local folder ``p``, sorted, following symbolic links but
    entering each real folder once and listing each real file once; what is not entered or read
    again is listed as skipped, with why. ``depth``: files at most that many folders down (1: the
    folder's own) are listed; deeper folders are not entered."""
    import os

    files, skipped, seen_dirs, seen_files = [], [], {}, {}
    for folder, dirs, names in os.walk(p, followlinks=True):
        if depth is not None and os.path.relpath(folder, p).count(os.sep) + (folder != p) >= depth - 1:
            dirs[:] = []  # its subfolders' files lie deeper than the glob reaches
        real = os.path.realpath(folder)
        if real in seen_dirs:  # a link back up (a loop) or a second way into a folder already read
            skipped.append({"path": folder, "reason": f"symbolic link loop: the same folder as {seen_dirs[real]}"})
            dirs[:] = []
            continue
        seen_dirs[real] = folder
        dirs.sort()
        for name in sorted(names):
            full = os.path.join(folder, name)
            try:
                real_file, size = os.path.realpath(full), os.stat(full).st_size
            except OSError as e:  # a dangling link
                skipped.append({"path": full, "reason": f"unreadable ({type(e).__name__})"})
                continue
            if real_file in seen_files:
                skipped.append({"path": full, "reason": f"the same file as {seen_files[real_file]} (a link)"})
                continue
            seen_files[real_file] = full
            files.append((full, size))
    return sorted(files), skipped


def sniff(head: bytes) -> str | None:
    """The compression a file's first bytes announce, or None."""
    return next((codec for magic, codec in MAGIC if head.startswith(magic)), None)


def open_stream(path: str):
    """A file's bytes as a stream, decompressed when its first bytes say it is compressed."""
    fs, p = storage.resolve(path)
    return decompressed(fs.open_input_file(p))


def read_bytes(path: str) -> bytes:
    """A whole file's bytes (a small one: an evaluation set), decompressed when its first bytes say
    it is compressed."""
    fs, p = storage.resolve(path)
    with storage.naming(path, "reading"), fs.open_input_file(p) as f:
        return decompressed(f).read()


def digest(data: bytes) -> str:
    """The first 16 hex digits of the SHA-256 of a file's contents (as :func:`read_bytes` gives them):
    the evaluate stage's identity of a task's file and the data stage's record of the evaluation
    files it checked the data against, compared in results.md. A file and a gzip of it are one."""
    return hashlib.sha256(data).hexdigest()[:16]


def file_hash(path: str) -> str:
    """:func:`digest` of the file at ``path`` (local or a URI)."""
    return digest(read_bytes(path))


def decompressed(f):
    """``f`` (a seekable pyarrow file), or a decompressing stream over it when it is compressed."""
    head = f.read(4)
    f.seek(0)
    codec = sniff(head)
    if codec in ("gzip", "bz2"):
        return Salvaging(f, codec)
    return pa.CompressedInputStream(f, codec) if codec else f


class Salvaging:
    """A gzip or bzip2 stream (several members too) that gives every byte it could decompress before
    a break: ``read(n)`` returns them, and only the read after them raises (``EOFError`` for a stream
    cut short, ``OSError`` for a corrupt one), naming the compressed offset. A decompressing stream
    that fails a whole block at once would lose the complete lines before the break."""

    PIECE = 1 << 14  # compressed bytes fed at a time

    def __init__(self, raw, codec: str):
        self.raw, self.codec, self.buf, self.fed = raw, codec, bytearray(), 0
        self.dec, self.done, self.error = self._decompressor(), False, None

    def _decompressor(self):
        return zlib.decompressobj(zlib.MAX_WBITS | 16) if self.codec == "gzip" else bz2.BZ2Decompressor()

    def _fill(self, want: int) -> None:
        while len(self.buf) < want and not self.done and self.error is None:
            piece = self.raw.read(self.PIECE)
            if not piece:
                self.done = True
                if not self.dec.eof:
                    self.error = EOFError(f"{self.codec} stream cut short after {self.fed:,} compressed bytes")
                return
            try:
                self.buf += self.dec.decompress(piece)
                while self.dec.eof and self.dec.unused_data:  # the next member
                    rest, self.dec = self.dec.unused_data, self._decompressor()
                    self.buf += self.dec.decompress(rest)
            except (zlib.error, OSError, EOFError, ValueError) as e:
                self.error = OSError(f"corrupt {self.codec} stream near compressed byte {self.fed:,}: {e}")
            self.fed += len(piece)

    def read(self, n: int = -1) -> bytes:
        self._fill(n if n is not None and n >= 0 else float("inf"))
        if self.error is not None and (not self.buf or n is None or n < 0):
            raise self.error
        n = len(self.buf) if n is None or n < 0 else n
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def close(self) -> None:
        self.raw.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
