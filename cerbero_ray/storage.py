"""Local paths and object-store URIs (s3://, gs://, …) behind one small API, on pyarrow.fs.

Three rules hold for every reader and writer of the project:

- **A file appears whole or not at all.** :func:`open_output` writes under a temporary name beside
  the file and renames it only once the writing block ended without an error (an object store:
  a server-side copy, then the temporary is deleted); on an error the temporary is deleted. An S3
  upload that fails half-way is never published under its final name (pyarrow would complete it
  on close: apache/arrow#40502). A rerun deletes the ``*.tmp`` a killed writer left.
- **A folder is complete only with its marker.** :func:`upload_folder` (an HF model, a trainer's
  metrics) writes ``.cerbero-writing`` first, then the files, then ``.cerbero-complete`` (the
  files and their sizes) last; :func:`check_folder` refuses a folder that was being written and
  is not complete, or whose files do not match its marker. A folder we did not write (a model
  from elsewhere) has neither and is taken as it is.
- **Transient errors are retried, in one place.** S3 clients retry with backoff
  (``CERBERO_S3_MAX_ATTEMPTS``, default 10, AWS's standard strategy: throttling, 5xx, dropped
  connections), and :func:`retried_io_errors` is what Ray Data retries on top.

Credentials are never read here: pyarrow takes them from the environment or the machine's role.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid

import pyarrow.fs as pafs

WRITING = ".cerbero-writing"
COMPLETE = ".cerbero-complete"
TMP_SUFFIX = ".tmp"


def is_uri(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


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
        if path.startswith("s3://"):
            inside = path[len("s3://") :].split("?", 1)[0].rstrip("/")
            return _s3(inside.split("/", 1)[0]), inside
        return pafs.FileSystem.from_uri(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(path))


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
    """A local folder's files copied to ``dest`` (local or URI), each whole or not at all, files
    already there with the same size skipped. With ``markers`` the folder is marked: after an
    interruption it reads as incomplete, never as a model or a run. Complete markers of subfolders
    (an HF folder inside a checkpoint) are copied after every other file."""
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
    for name in sorted(names, key=lambda n: os.path.basename(n) == COMPLETE):  # nested markers last
        target = join(dest, *name.split(os.sep))
        info = fs.get_file_info(resolve(target)[1])
        if not (info.is_file and info.size == os.path.getsize(os.path.join(local_dir, name))):
            upload_file(os.path.join(local_dir, name), target)
    if markers:
        sizes = {n.replace(os.sep, "/"): os.path.getsize(os.path.join(local_dir, n)) for n in names}
        write_json(join(dest, COMPLETE), {"files": sizes})
        with contextlib.suppress(FileNotFoundError):
            fs.delete_file(resolve(join(dest, WRITING))[1])
    return dest


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
        json.dump({"files": sizes}, f)


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


def local_copy(path: str, cache: str | None = None) -> str:
    """A local folder holding ``path``: the path itself when local, else a cached download. The
    copy goes into a temporary folder renamed into place once whole, so a download cut short (or
    two processes downloading at once) never leaves a partial folder in the cache."""
    if not is_uri(path):
        return resolve(path)[1]
    root = cache or cache_dir()
    dest = os.path.join(root, hashlib.sha256(path.encode()).hexdigest()[:16])
    if os.path.exists(os.path.join(dest, ".complete")):
        return dest
    check_folder(path, path)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".download-", dir=root)
    try:
        fs, src = resolve(path)
        pafs.copy_files(src, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, dest)
        except OSError:  # another process put it there first
            if not os.path.exists(os.path.join(dest, ".complete")):
                shutil.rmtree(dest, ignore_errors=True)
                os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def local_file(path: str, cache: str | None = None) -> str:
    """A local path holding the file ``path``: itself when local, else a cached download (written
    under a temporary name and renamed, so a download cut short is never taken for the file)."""
    if not is_uri(path):
        return resolve(path)[1]
    root = cache or cache_dir()
    dest = os.path.join(root, hashlib.sha256(path.encode()).hexdigest()[:16] + "-" + posixpath.basename(path))
    if not os.path.exists(dest):
        os.makedirs(root, exist_ok=True)
        fs, src = resolve(path)
        tmp = f"{dest}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:
            with naming(path, "reading"), fs.open_input_stream(src, compression=None) as f, open(tmp, "wb") as out:
                shutil.copyfileobj(f, out, 1 << 24)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
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
