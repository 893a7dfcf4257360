"""Local paths and object-store URIs (s3://, gs://, …) behind one small API, on pyarrow.fs.

Three rules hold for every reader and writer of the project:

- **A file appears whole or not at all.** :func:`open_output` writes under a temporary name beside
  the file and renames it only once the writing block ended without an error (an object store:
  a server-side copy, then the temporary is deleted); on an error the temporary is deleted. An S3
  upload that fails half-way is never published under its final name (pyarrow would complete it
  on close: apache/arrow#40502). A rerun deletes the ``*.tmp`` a killed writer left.
- **A folder is complete only with its marker.** :func:`upload_folder` (an HF model, a trainer's
  metrics) writes ``.cerbero-writing`` first, then the files, then ``.cerbero-complete`` (the
  files and their sizes, and an id of this writing) last; :func:`check_folder` refuses a folder
  that was being written and is not complete, or whose files do not match its marker. A folder we
  did not write (a model from elsewhere) has neither and is taken as it is. A folder written again
  is written whole: every file, the older files it lacks deleted.
- **Transient errors are retried, in one place.** S3 clients retry with backoff
  (``CERBERO_S3_MAX_ATTEMPTS``, default 10, AWS's standard strategy: throttling, 5xx, dropped
  connections), and :func:`retried_io_errors` is what Ray Data retries on top.

Credentials are never read here: pyarrow takes them from the environment or the machine's role.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable

import pyarrow.fs as pafs

log = logging.getLogger(__name__)

WRITING = ".cerbero-writing"
COMPLETE = ".cerbero-complete"
TMP_SUFFIX = ".tmp"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")  # the object stores pyarrow's filesystems read


def check_scheme(path: str, key: str | None = None) -> None:
    """``ValueError`` (naming ``key``) when ``path`` is a URI of a scheme no storage here reads (an
    ``https://`` download link, Hadoop's ``s3a://``): one line, not pyarrow's "Unrecognized filesystem"."""
    if is_uri(path):
        scheme = path.split("://", 1)[0]
        if scheme.lower() not in (*SCHEMES, "mock"):
            known = ", ".join(f"{s}://" for s in SCHEMES)
            hint = f": write it s3://{path.split('://', 1)[1]}" if scheme.lower() in ("s3a", "s3n") else ""
            raise ValueError(
                f"{key + ': ' if key else ''}{path}: {scheme}:// is not a storage this platform reads or writes "
                f"(a local path, or {known}){hint}"
            )


GLOB_CHARS = "*?["


def split_glob(path: str) -> tuple[str, str | None]:
    """(folder, pattern) of a glob: the folder is the parts before the first one holding a glob
    character (``"."`` when it names none), the pattern the rest, relative to it (``corpus/*.jsonl``
    -> (``corpus``, ``*.jsonl``); ``s3://b/c/**/*.json`` -> (``s3://b/c``, ``**/*.json``)); a path
    with no glob: (``path``, None). See :func:`glob_match` for what a pattern matches."""
    parts = path.split("/")
    first = next((i for i, part in enumerate(parts) if any(c in part for c in GLOB_CHARS)), None)
    if first is None:
        return path, None
    folder = "/".join(parts[:first])
    return folder or ("/" if path.startswith("/") else "."), "/".join(parts[first:])


def glob_match(rel: str, pattern: str) -> bool:
    """Whether the path ``rel`` (relative to a glob's folder, ``/``-separated) matches ``pattern``
    as a shell, Python's glob and the datasets library match it: each part by :mod:`fnmatch` rules
    (``*`` never crosses a ``/``), and a part ``**`` any number of folders, none included
    (``*.jsonl`` is the folder's own files; ``**/*.jsonl`` those of every folder under it)."""
    return _match(rel.split("/"), pattern.split("/"))


def _match(names: list[str], parts: list[str]) -> bool:
    if not parts:
        return not names
    if parts[0] == "**":
        return any(_match(names[i:], parts[1:]) for i in range(len(names) + 1))
    return bool(names) and fnmatch.fnmatchcase(names[0], parts[0]) and _match(names[1:], parts[1:])


def is_local(path: str) -> bool:
    """A path on this machine's disk (plain, or ``file://``), not an object-store URI."""
    return not is_uri(path)


def local_path(path: str) -> str:
    """A local path (plain or ``file://``) as the OS names it."""
    return os.path.expanduser(path.removeprefix("file://"))


def max_attempts() -> int:
    return int(os.environ.get("CERBERO_S3_MAX_ATTEMPTS", "10"))


@functools.lru_cache(maxsize=32)
def _s3(bucket: str) -> pafs.S3FileSystem:
    """One S3 client per bucket, in the bucket's region, with retries and timeouts."""
    probe, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")  # finds the bucket's region
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")  # MinIO, R2, moto…
    where = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        where = {"endpoint_override": host.rstrip("/") or scheme, "scheme": scheme if host else "https"}
    return pafs.S3FileSystem(
        region=probe.region,
        **where,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=max_attempts()),
        connect_timeout=float(os.environ.get("CERBERO_S3_CONNECT_TIMEOUT_S", "10")),
        request_timeout=float(os.environ.get("CERBERO_S3_REQUEST_TIMEOUT_S", "60")),
    )


def resolve(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it; local paths become absolute."""
    if is_uri(path):
        check_scheme(path)
        scheme, rest = path.split("://", 1)
        rest = re.sub(r"/{2,}", "/", rest)  # s3://b/run/ + /data: one key, as the folder it names
        if scheme == "s3":
            inside = rest.split("?", 1)[0].rstrip("/")
            return _s3(inside.split("/", 1)[0]), inside
        return pafs.FileSystem.from_uri(f"{scheme}://{rest}")
    if path.startswith("file://"):
        path = path[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


def _where(path: str) -> str:
    """A path as one string to compare with another: a local one real and absolute, a URI as its
    scheme and resolved path (no query, no trailing ``/``)."""
    if is_uri(path):
        scheme, inside = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(inside.split('?', 1)[0]).strip('/')}"
    return os.path.realpath(local_path(path))


def within(path: str, folder: str) -> bool:
    """Whether ``path`` (local or a URI) is the folder ``folder`` or lies inside it, links followed
    on a local disk; a local path is never inside a URI, nor a URI in another bucket."""
    if is_uri(path) != is_uri(folder):
        return False
    p, f = _where(path), _where(folder)
    return p == f or p.startswith(f.rstrip("/") + "/")


def join(base: str, *parts: str) -> str:
    return posixpath.join(base, *parts) if is_uri(base) else os.path.join(base, *parts)


def _parent(path: str, inside: str) -> str:
    return posixpath.dirname(inside) if is_uri(path) else os.path.dirname(inside)


class StorageError(OSError):
    """A storage operation that failed after the client's retries, naming the path or URI."""


@contextlib.contextmanager
def naming(path: str, what: str = "writing"):
    """Errors of the storage client inside the block name ``path`` (an S3 error names only its
    bucket when the bucket itself is what failed)."""
    try:
        yield
    except (StorageError, FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError):
        raise
    except OSError as e:
        if not is_uri(path):
            raise
        raise StorageError(f"{what} {path}: {e}") from e


@contextlib.contextmanager
def open_output(path: str):
    """A binary stream that writes ``path`` (local or URI) whole or not at all (see the module's
    docstring); parent folders are created."""
    fs, p = resolve(path)
    if not is_uri(path):  # an object store has no folders to make (pyarrow would add marker objects)
        fs.create_dir(_parent(path, p), recursive=True)
    tmp = f"{p}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
    try:
        with naming(path):
            with fs.open_output_stream(tmp) as f:
                yield f
            fs.move(tmp, p)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(tmp)
        raise


def write_bytes(path: str, data: bytes) -> str:
    with open_output(path) as f:
        f.write(data)
    return path


MOVE_LIMIT = 4 << 30  # S3 copies an object server-side in one request only up to 5 GB


def upload_file(local: str, path: str) -> str:
    """A local file copied to ``path`` (whole or not at all). On an object store a file over
    :data:`MOVE_LIMIT` (a 7B model's GGUF) goes straight to its key: a multipart upload is published
    only when completed, and one that fails is deleted at once."""
    if not is_uri(path) or os.path.getsize(local) <= MOVE_LIMIT:
        with open(local, "rb") as src, open_output(path) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
        return path
    fs, p = resolve(path)
    try:
        with naming(path), open(local, "rb") as src, fs.open_output_stream(p) as dst:
            shutil.copyfileobj(src, dst, 1 << 24)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.delete_file(p)
        raise
    return path


def write_json(path: str, obj, indent: int | None = 1) -> str:
    """``obj`` as JSON at ``path`` (a local path or URI), parent folders created; returns ``path``."""
    return write_bytes(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=str).encode())


def delete_tmp(folder: str) -> None:
    """Delete the temporary files a killed writer left in ``folder`` (not recursive)."""
    fs, p = resolve(folder)
    for i in fs.get_file_info(pafs.FileSelector(p, allow_not_found=True)):
        if i.type == pafs.FileType.File and i.base_name.endswith(TMP_SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(i.path)


def upload_folder(local_dir: str, dest: str, markers: bool = True) -> str:
    """A local folder's files copied to ``dest`` (local or URI), each whole or not at all, every one
    of them: a file already there is written over even at the same size (a model saved again after
    more steps has the same sizes and other weights). With ``markers`` the folder is one thing
    written whole (a model): it is marked, so that after an interruption it reads as incomplete,
    never as a model or a run, and the files it held before that this copy lacks are deleted.
    Without, files are added beside what is there (each rank's part of a checkpoint, a run's
    metrics beside its checkpoints). Complete markers of subfolders (an HF folder inside a
    checkpoint) are copied after every other file."""
    fs, p = resolve(dest)
    if not is_uri(dest):
        fs.create_dir(p, recursive=True)
    names = sorted(
        os.path.relpath(os.path.join(r, f), local_dir)
        for r, _, files in os.walk(local_dir)
        for f in files
        if not (r == local_dir and f in (WRITING, COMPLETE))
    )
    if markers:
        write_bytes(join(dest, WRITING), b"")
        _delete_others(fs, p, {n.replace(os.sep, "/") for n in names} | {WRITING})
    for name in sorted(names, key=lambda n: os.path.basename(n) == COMPLETE):  # nested markers last
        upload_file(os.path.join(local_dir, name), join(dest, *name.split(os.sep)))
    if markers:
        sizes = {n.replace(os.sep, "/"): os.path.getsize(os.path.join(local_dir, n)) for n in names}
        write_json(join(dest, COMPLETE), {"files": sizes, "id": uuid.uuid4().hex})
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(resolve(join(dest, WRITING))[1])
    return dest


def _delete_others(fs: pafs.FileSystem, p: str, keep: set[str]) -> None:
    """Files under the folder ``p`` that ``keep`` does not name (its relative paths): what a folder
    written again over an older one must not keep (an older model's shards and their index would
    be loaded beside, or instead of, the new weights)."""
    if fs.get_file_info(p).type != pafs.FileType.Directory:
        return
    for info in fs.get_file_info(pafs.FileSelector(p, recursive=True)):
        if info.is_file and info.path[len(p) :].lstrip("/") not in keep:
            with contextlib.suppress(FileNotFoundError):
                fs.delete_file(info.path)


def mark_complete(local_dir: str) -> None:
    """Write the complete marker of a local folder whose files are all written (before it is renamed
    into place, or uploaded)."""
    sizes = {
        os.path.relpath(os.path.join(r, f), local_dir): os.path.getsize(os.path.join(r, f))
        for r, _, files in os.walk(local_dir)
        for f in files
        if f not in (WRITING, COMPLETE)
    }
    with open(os.path.join(local_dir, COMPLETE), "w") as f:
        json.dump({"files": sizes, "id": uuid.uuid4().hex}, f)


def check_folder(path: str, key: str) -> None:
    """``ValueError`` naming ``key`` when the folder at ``path`` was being written and is not complete,
    or misses files its complete marker lists (a copy cut short, a file deleted since)."""
    fs, p = resolve(path)
    marker = fs.get_file_info(resolve(join(path, COMPLETE))[1])
    if not marker.is_file:
        if fs.get_file_info(resolve(join(path, WRITING))[1]).is_file:
            raise ValueError(
                f"{key}: {path} is incomplete (its copy was cut short: no {COMPLETE}); write it again "
                "(rerun the stage that made it)"
            )
        return
    listed = read_json(join(path, COMPLETE)).get("files", {})
    for name, size in listed.items():
        info = fs.get_file_info(resolve(join(path, *name.split("/")))[1])
        if not info.is_file or info.size != size:
            have = f"{info.size} bytes" if info.is_file else "missing"
            raise ValueError(f"{key}: {path} is incomplete: {name} is {have}, its marker says {size} bytes")


def cache_dir() -> str:
    return os.environ.get("CERBERO_CACHE", os.path.expanduser("~/.cache/cerbero_ray"))


CACHE_MAX_ENV = "CERBERO_CACHE_MAX_GB"  # the most the cache may hold (unset: the disk's free space)
CACHE_IDLE_S = 600  # a copy used within this many seconds is never deleted to make room
_HEADROOM = 1 << 30  # free space left on the disk after a copy


def _entries(root: str) -> list[tuple[float, int, str]]:
    """The cache's copies: (last use, bytes, path), oldest first (not the lock files, not a copy
    being made)."""
    out = []
    for name in os.listdir(root):
        if name.startswith(".") or name.endswith(TMP_SUFFIX):
            continue
        path = os.path.join(root, name)
        try:
            used = os.stat(path).st_mtime
            size = (
                sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
                if os.path.isdir(path)
                else os.path.getsize(path)
            )
        except OSError:  # deleted meanwhile
            continue
        out.append((used, size, path))
    return sorted(out)


def _make_room(root: str, key: str, path: str, need: int, current: str) -> None:
    """Room in the cache for ``need`` more bytes (a copy of ``path``, whose copies are named
    ``<key>-…``; ``current``: the prefix of those of what it holds now): its older versions go
    first, then the copies of other URIs unused for the longest (none used in the last
    :data:`CACHE_IDLE_S` s, none another process is copying), until the disk keeps 1 GiB free
    after the copy and the cache stays under ``CERBERO_CACHE_MAX_GB``. When that is not enough, a
    ``ValueError`` (one line, as the checks of a config) says so before anything is downloaded,
    not "No space left on device" half-way through a checkpoint."""
    raw = os.environ.get(CACHE_MAX_ENV, "").strip()
    try:
        cap = int(float(raw) * 2**30) if raw else None
    except ValueError:
        raise ValueError(f"{CACHE_MAX_ENV}={raw!r}: a number of GB, e.g. {CACHE_MAX_ENV}=200") from None
    entries = _entries(root)
    held = sum(size for _, size, _ in entries)
    free = shutil.disk_usage(root).free

    def short() -> bool:
        return free - need < _HEADROOM or (cap is not None and held + need > cap)

    def stale(name: str) -> bool:  # an older version of this URI: deleted after the copy anyway
        return name.startswith(key) and not name.startswith(current)

    dropped = 0
    for used, size, victim in sorted(entries, key=lambda e: not stale(os.path.basename(e[2]))):  # stale first
        if not short():
            break
        name = os.path.basename(victim)
        if not stale(name) and (time.time() - used < CACHE_IDLE_S or _busy(root, name.split("-", 1)[0])):
            continue
        with contextlib.suppress(OSError):
            shutil.rmtree(victim) if os.path.isdir(victim) else os.remove(victim)
            free, held, dropped = free + size, held - size, dropped + 1
    if dropped:
        log.info(
            f"[cache] deleted {dropped} older cop{'y' if dropped == 1 else 'ies'} in {root} to make room for {path}"
        )
    if short():
        gb = 2**30
        why = (
            f"{free / gb:.1f} GB free on its disk (1 GB kept free)"
            if free - need < _HEADROOM
            else f"the cache holds {held / gb:.1f} GB of {cap / gb:.1f} ({CACHE_MAX_ENV})"
        )
        raise ValueError(
            f"copying {path} needs {need / gb:.2f} GB in the cache {root}; {why}, after deleting the copies "
            f"unused for {CACHE_IDLE_S // 60} min: set CERBERO_CACHE to a larger disk, or free space"
        )


def _lock_path(root: str, key: str) -> str:
    """The lock file of one URI's copies (:func:`_cache_lock`)."""
    return os.path.join(root, f".{key}.lock")


def _busy(root: str, key: str) -> bool:
    """Whether another process holds the copy lock of ``key`` (it is copying that URI)."""
    import fcntl

    lock = _lock_path(root, key)
    if not os.path.exists(lock):
        return False
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _used(path: str) -> None:
    """Mark a cached copy as used now (the cache deletes the least recently used first)."""
    with contextlib.suppress(OSError):
        os.utime(path)


def _listing(fs: pafs.FileSystem, src: str) -> list:
    """Each file under ``src``: its path inside, size and modification time (one listing; an
    object store's LIST returns them). A folder rewritten since (a run trained again under the
    same name, an adapter saved again) lists differently, whatever its sizes."""
    infos = fs.get_file_info(pafs.FileSelector(src, recursive=True))
    return sorted([i.path[len(src) :].lstrip("/"), i.size, i.mtime_ns] for i in infos if i.is_file)


def _read_bytes(fs: pafs.FileSystem, p: str) -> bytes:
    with fs.open_input_stream(p, compression=None) as f:
        return f.read()


def _version(*what) -> str:
    return hashlib.sha256(json.dumps(what).encode()).hexdigest()[:12]


def _folder_version(fs: pafs.FileSystem, p: str) -> tuple[list, str]:
    """The folder's listing and its version: the listing, and the ids our complete markers hold
    (the folder's, an HF folder's in a checkpoint): a folder written again within the same second
    at the same sizes differs there."""
    listed = _listing(fs, p)
    marks = [_read_bytes(fs, f"{p}/{f}").decode() for f, _, _ in listed if posixpath.basename(f) == COMPLETE]
    return listed, _version(listed, marks)


def version(path: str) -> str | None:
    """What the folder or file at ``path`` (local or URI) holds now, as 12 hex digits. A run keyed
    on a checkpoint (labeling, generation, evaluation) keys on this too, so a checkpoint written
    again under the same path (a run trained again under its name) is not taken for the one it ran
    on. A folder we wrote: its complete marker (its files, their sizes, the id of that writing),
    so a copy of it (rsync, ``cp -r``) is the same version. Any other folder: each file's path
    inside, size and modification time (one listing), so a copy of it, or a file touched, reads as
    another. A file: its size and modification time. None: nothing there, or an http(s) endpoint
    (what it serves is its own)."""
    if path.startswith(("http://", "https://")):
        return None
    fs, p = resolve(path)
    with naming(path, "reading"):
        info = fs.get_file_info(p)
        if info.is_file:
            return _version(info.size, info.mtime_ns)
        if info.type != pafs.FileType.Directory:
            return None
        if fs.get_file_info(f"{p}/{COMPLETE}").is_file:
            return _version(_read_bytes(fs, f"{p}/{COMPLETE}").decode())
        return _folder_version(fs, p)[1]


def _drop_other_versions(root: str, key: str, keep: str | None) -> None:
    """Earlier copies of the same URI (``<key>-…``, or the bare ``<key>`` older releases made):
    the URI holds something else now (``keep``: the names that start so are the copies of what it
    holds now). A process still reading one loses it; one that loaded it (weights in memory) does
    not notice."""
    for name in os.listdir(root):
        if keep is not None and name.startswith(keep):
            continue
        if (name == key or name.startswith(f"{key}-")) and not name.endswith(TMP_SUFFIX):
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def drop_copy(path: str, cache: str | None = None) -> None:
    """Delete the cached copies of the URI ``path`` (:func:`local_copy`, :func:`local_file`)."""
    root = cache or cache_dir()
    if is_uri(path) and os.path.isdir(root):
        _drop_other_versions(root, hashlib.sha256(path.encode()).hexdigest()[:16], None)


def local_copy(path: str, cache: str | None = None, only: Callable[[str], bool] | None = None, part: str = "") -> str:
    """A local folder holding ``path``: the path itself when local, else a cached download. The
    cache keys on the URI and on what it lists (each file's size and modification time: one
    listing per call), so a URI written again is downloaded again, never served from the copy of
    what it held before; that older copy is then deleted. One process at a time copies a URI (the
    others wait for its copy). The copy goes into a temporary folder renamed into place once
    whole, so a download cut short never leaves a partial folder in the cache; a folder that
    changes while it is copied is refused (``ValueError``: copy it again once its writer is done).
    ``only``: the files to copy (their paths inside, ``/``-separated), a part of the folder named
    ``part`` in the cache (a resume's: this node's ranks' state, not the whole checkpoint)."""
    if not is_uri(path):
        return resolve(path)[1]
    root = cache or cache_dir()
    fs, src = resolve(path)
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    with naming(path, "reading"):
        listed, ver = _folder_version(fs, src)
    current = f"{key}-{ver}"  # the copies of what the URI holds now: the whole folder, or parts
    name = current + (f"-{part}" if part else "")
    dest = os.path.join(root, name)
    if os.path.exists(os.path.join(dest, ".complete")):
        _used(dest)
        return dest
    check_folder(path, path)
    with _cache_lock(root, key):
        if os.path.exists(os.path.join(dest, ".complete")):  # another process copied it meanwhile
            _used(dest)
            return dest
        wanted = [(f, size) for f, size, _ in listed if only is None or only(f)]
        _make_room(root, key, path, sum(size for _, size in wanted), current)
        tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
        try:
            with naming(path, "reading"):
                if only is None:
                    pafs.copy_files(src, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
                else:
                    _copy_some(fs, src, tmp, [f for f, _ in wanted])
                if _listing(fs, src) != listed:
                    raise ValueError(f"{path} changed while it was being copied; run again once its writer is done")
            open(os.path.join(tmp, ".complete"), "w").close()
            shutil.rmtree(dest, ignore_errors=True)  # a copy cut short by an older release
            os.rename(tmp, dest)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _drop_other_versions(root, key, current)  # other parts of this version stay
    return dest


def _copy_some(fs: pafs.FileSystem, src: str, dest: str, files: list[str]) -> None:
    """The files ``files`` (paths inside ``src``) copied into the local folder ``dest``, several at
    once (as ``copy_files`` copies a whole folder)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(f: str) -> None:
        out = os.path.join(dest, *f.split("/"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        pafs.copy_files(f"{src}/{f}", out, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, files))


@contextlib.contextmanager
def _cache_lock(root: str, key: str):
    """One process at a time copies a URI into the cache; the others wait, then take its copy: the
    ranks on one node resuming from the same checkpoint download it once, not once each (a lock
    on ``<root>/.<key>.lock``, released by the kernel if its holder dies)."""
    import fcntl

    os.makedirs(root, exist_ok=True)
    with open(_lock_path(root, key), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def local_file(path: str, cache: str | None = None) -> str:
    """A local path holding the file ``path``: itself when local, else a cached download, keyed on
    the URI, its size and modification time (so a file written again is downloaded again; the
    older copy is deleted), written under a temporary name and renamed, so a download cut short
    is never taken for the file."""
    if not is_uri(path):
        return resolve(path)[1]
    root = cache or cache_dir()
    fs, src = resolve(path)
    with naming(path, "reading"):
        info = fs.get_file_info(src)
    if not info.is_file:
        raise FileNotFoundError(f"no such file: {path}")
    key = hashlib.sha256(path.encode()).hexdigest()[:16]
    name = f"{key}-{_version(info.size, info.mtime_ns)}-{posixpath.basename(path)}"
    dest = os.path.join(root, name)
    if os.path.exists(dest):
        _used(dest)
        return dest
    with _cache_lock(root, key):
        if os.path.exists(dest):  # another process copied it meanwhile
            _used(dest)
            return dest
        _make_room(root, key, path, info.size, name)
        tmp = f"{dest}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:
            with naming(path, "reading"), fs.open_input_stream(src, compression=None) as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 24)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        _drop_other_versions(root, key, name)
    return dest


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
    fs, p = resolve(path)
    with naming(path, "reading"):
        if not fs.get_file_info(p).is_file:
            raise FileNotFoundError(f"no such file: {path}")
        with fs.open_input_stream(p, compression=None) as f:
            return json.loads(f.read())


def retried_io_errors() -> list[str]:
    """Error messages Ray Data retries a read or write on, beyond its own defaults: what object
    stores answer under load or while a connection drops (the S3 client has already retried)."""
    return [
        "SlowDown",
        "503",
        "Service Unavailable",
        "Connection reset",
        "connection reset",
        "Connection refused",
        "Broken pipe",
        "timed out",
        "Timeout",
        "Couldn't connect to server",
        "curlCode: 7",
        "curlCode: 28",
        "curlCode: 56",
        "INTERNAL_FAILURE",
        "NETWORK_CONNECTION",
    ]
