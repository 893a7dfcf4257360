"""Local paths and object-store URIs (s3://, gs://, …) behind one small API, on pyarrow.fs."""

from __future__ import annotations

import fnmatch
import hashlib
import os
import posixpath

import pyarrow.fs as pafs


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it; local paths become absolute."""
    if is_uri(path):
        return pafs.FileSystem.from_uri(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def list_files(path: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files under ``path`` (a file, a folder, or a glob in its last part), sorted, as full paths/URIs."""
    fs, p = resolve(path)
    prefix = path[: len(path) - len(p)] if is_uri(path) else ""
    pattern = None
    if any(c in posixpath.basename(p) for c in "*?["):
        p, pattern = posixpath.dirname(p), posixpath.basename(p)
    info = fs.get_file_info(p)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {path}")
    if info.type == pafs.FileType.File:
        return [path]
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=True))
    files = sorted(
        i.path
        for i in infos
        if i.type == pafs.FileType.File
        and not posixpath.basename(i.path).startswith((".", "_"))
        and (pattern is None or fnmatch.fnmatch(posixpath.basename(i.path), pattern))
        and (not suffixes or i.path.endswith(suffixes))
    )
    if not files:
        raise FileNotFoundError(f"no input files{' ' + str(suffixes) if suffixes else ''} under {path}")
    return [prefix + f if prefix and not f.startswith(prefix) else f for f in files]


def local_copy(path: str, cache_dir: str | None = None) -> str:
    """A local folder holding ``path``: the path itself when local, else a cached download."""
    if not is_uri(path):
        return resolve(path)[1]
    cache_dir = cache_dir or os.environ.get("CERBERO_CACHE", os.path.expanduser("~/.cache/cerbero_ray"))
    dest = os.path.join(cache_dir, hashlib.sha256(path.encode()).hexdigest()[:16])
    if not os.path.exists(os.path.join(dest, ".complete")):
        fs, src = resolve(path)
        pafs.copy_files(src, dest, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        open(os.path.join(dest, ".complete"), "w").close()
    return dest


def write_json(path: str, obj, indent: int | None = 1) -> str:
    """``obj`` as JSON at ``path`` (a local path or URI), parent folders created; returns ``path``."""
    import json

    fs, p = resolve(path)
    fs.create_dir(posixpath.dirname(p) if is_uri(path) else os.path.dirname(p), recursive=True)
    with fs.open_output_stream(p) as f:
        f.write(json.dumps(obj, indent=indent, ensure_ascii=False, default=str).encode())
    return path


BOM = b"\xef\xbb\xbf"  # the UTF-8 byte-order mark Windows tools put at the start of a text file


def strip_bom(head: bytes) -> bytes:
    """A file's first bytes without a UTF-8 byte-order mark (which would make its first JSON line invalid)."""
    return head[len(BOM) :] if head.startswith(BOM) else head


def is_file(path: str) -> bool:
    """Whether ``path`` (local or a URI) is a file."""
    fs, p = resolve(path)
    return fs.get_file_info(p).is_file


def read_json(path: str):
    """The JSON at ``path``; ``FileNotFoundError`` when there is none."""
    import json

    fs, p = resolve(path)
    if not fs.get_file_info(p).is_file:
        raise FileNotFoundError(f"no such file: {path}")
    with fs.open_input_stream(p) as f:
        return json.loads(f.read())
