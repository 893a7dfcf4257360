"""Storage on a real S3-protocol server (moto's, on loopback, through AWS_ENDPOINT_URL) and on a
local disk: a file appears whole or not at all, a folder is complete only with its marker, a
cached copy of a URI folder works and is never half there, transient faults on the wire (503
SlowDown, dropped connections, stalls) are retried, and an endpoint that is gone is an error."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from faults import FaultProxy

from cerbero_ray import batchjob, storage
from conftest import S3_PORT


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """A folder on a local disk, or a fresh bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("bucket")


def _names(path: str) -> list[str]:
    fs, p = storage.resolve(path)
    return sorted(
        i.path[len(p) + 1 :]
        for i in fs.get_file_info(storage.pafs.FileSelector(p, recursive=True, allow_not_found=True))
        if i.type == storage.pafs.FileType.File
    )


def _read(path: str) -> bytes:
    fs, p = storage.resolve(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def test_a_write_that_fails_is_never_published(root):
    dest = storage.join(root, "out", "x.bin")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_output(dest) as f:
            f.write(b"x" * 1000)
            raise RuntimeError("boom")
    assert not storage.is_file(dest) and _names(root) == []  # neither the file nor its temporary
    storage.write_json(dest, {"ok": True})
    assert storage.read_json(dest) == {"ok": True} and _names(root) == ["out/x.bin"]


def test_a_part_whose_write_fails_midway_is_redone_by_the_rerun(root, tmp_path, monkeypatch):
    """A labeling worker whose Parquet write fails leaves no part: the rerun does that chunk."""
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": i, "text": f"t{i}"}) + "\n" for i in range(10)))
    (chunk,) = batchjob.plan_chunks(str(inp), "auto", 100)[0]
    table = pa.table({"id": [str(i) for i in range(10)]})
    real = pq.write_table

    def half_then_fail(t, where, **kw):
        where.write(b"PAR1" + b"\0" * 500)
        raise OSError("the disk went away")

    monkeypatch.setattr(pq, "write_table", half_then_fail)
    with pytest.raises(OSError, match="went away"):
        batchjob.write_part(root, chunk, table)
    assert batchjob.done_keys(root) == set()  # nothing counts as done
    monkeypatch.setattr(pq, "write_table", real)
    batchjob.clean_partial(root)
    batchjob.write_part(root, chunk, table)
    assert batchjob.done_keys(root) == {chunk.key}
    fs, p = storage.resolve(storage.join(root, "parts"))
    assert pq.read_table(p, filesystem=fs).column("id").to_pylist() == [str(i) for i in range(10)]


def _folder(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text('{"model_type": "mistral"}')
    (src / "model.safetensors").write_bytes(os.urandom(100_000))
    (src / "sub" / "x.txt").write_text("nested")
    return src


def test_a_folder_is_complete_only_with_its_marker(root, tmp_path):
    src = _folder(tmp_path)
    dest = storage.join(root, "hf")
    storage.upload_folder(str(src), dest)
    storage.check_folder(dest, "x.checkpoint")
    assert set(_names(dest)) == {storage.COMPLETE, "config.json", "model.safetensors", "sub/x.txt"}
    # a copy cut short: the writing mark is there, the complete one is not
    storage.write_bytes(storage.join(dest, storage.WRITING), b"")
    fs, p = storage.resolve(storage.join(dest, storage.COMPLETE))
    fs.delete_file(p)
    with pytest.raises(ValueError, match=r"x.checkpoint: .* is incomplete \(its copy was cut short"):
        storage.check_folder(dest, "x.checkpoint")
    # complete, then a file lost: the marker's sizes say so
    storage.upload_folder(str(src), dest)
    storage.write_bytes(storage.join(dest, "model.safetensors"), b"short")
    with pytest.raises(ValueError, match="model.safetensors is 5 bytes, its marker says 100000 bytes"):
        storage.check_folder(dest, "x.checkpoint")
    storage.check_folder(str(src), "x")  # a folder we did not write (no markers) is taken as it is


def test_a_folder_written_again_holds_the_new_files_only(root, tmp_path):
    """A model saved again over an older one (a run resumed and trained further, an adapter saved
    again): same names, same sizes, other bytes; and a file the new one lacks (an older model's
    shard index, which transformers would load instead) is gone."""
    src = _folder(tmp_path)
    dest = storage.join(root, "hf")
    storage.upload_folder(str(src), dest)
    storage.write_bytes(storage.join(dest, "model.safetensors.index.json"), b"{}")  # the older model's
    new = os.urandom(100_000)
    (src / "model.safetensors").write_bytes(new)
    storage.upload_folder(str(src), dest)
    assert _read(storage.join(dest, "model.safetensors")) == new
    assert set(_names(dest)) == {storage.COMPLETE, "config.json", "model.safetensors", "sub/x.txt"}
    storage.check_folder(dest, "x.checkpoint")
    # without markers (a rank's part of a checkpoint, a run's metrics) files are added beside
    other = tmp_path / "other"
    other.mkdir()
    (other / "rank_1.pt").write_bytes(b"1")
    storage.upload_folder(str(other), dest, markers=False)
    assert "config.json" in _names(dest) and "rank_1.pt" in _names(dest)


def test_a_version_changes_when_the_folder_or_file_is_written_again(root, tmp_path):
    """What runs keyed on a checkpoint (labels, generations, evaluations) key on besides its path:
    the same while nothing is written there, another once it is (our folders' markers tell two
    writings apart at the same sizes in the same second; a file, by size or time)."""
    src = _folder(tmp_path)
    dest = storage.join(root, "hf")
    assert storage.version(dest) is None and storage.version("http://127.0.0.1:1/v1") is None
    storage.upload_folder(str(src), dest)
    v = storage.version(dest)
    assert v == storage.version(dest)
    storage.upload_folder(str(src), dest)  # the same bytes written again: another writing
    assert storage.version(dest) != v
    v = storage.version(dest)
    copy = storage.join(root, "copy")
    for name in _names(dest):  # a copy of our folder (as rsync makes it: other times) is the same model
        storage.write_bytes(storage.join(copy, name), _read(storage.join(dest, name)))
    assert storage.version(copy) == v
    foreign = storage.join(root, "foreign")  # a folder we did not write: its files' sizes and times
    storage.write_bytes(storage.join(foreign, "config.json"), b"{}")
    u = storage.version(foreign)
    storage.write_bytes(storage.join(foreign, "config.json"), b"{}" * 2)
    assert storage.version(foreign) != u
    f = storage.join(root, "m.gguf")
    storage.write_bytes(f, b"a" * 10)
    w = storage.version(f)
    assert w == storage.version(f) and w != storage.version(dest)
    storage.write_bytes(f, b"a" * 11)
    assert storage.version(f) != w


def test_a_cached_copy_of_a_uri_is_what_the_uri_holds_now(bucket, tmp_path):
    """A URI written again (a run trained again under its name) is copied again, even at the same
    sizes within the same second (our folders' markers tell the writings apart); the older copy is
    deleted. So for a single file, by its size and modification time."""
    src = _folder(tmp_path)
    cache = str(tmp_path / "cache")
    uri = f"{bucket}/run/hf"
    storage.upload_folder(str(src), uri)
    first = storage.local_copy(uri, cache)
    new = os.urandom(100_000)
    (src / "model.safetensors").write_bytes(new)
    storage.upload_folder(str(src), uri)
    again = storage.local_copy(uri, cache)
    assert again != first and open(os.path.join(again, "model.safetensors"), "rb").read() == new
    copies = [n for n in os.listdir(cache) if not n.startswith(".")]  # beside the lock files
    assert storage.local_copy(uri, cache) == again and copies == [os.path.basename(again)]
    gguf = f"{bucket}/export/model.gguf"
    storage.write_bytes(gguf, b"a" * 1000)
    one = storage.local_file(gguf, cache)
    assert storage.local_file(gguf, cache) == one  # cached
    storage.write_bytes(gguf, b"b" * 1001)
    two = storage.local_file(gguf, cache)
    assert open(two, "rb").read() == b"b" * 1001 and not os.path.exists(one)
    with pytest.raises(FileNotFoundError):
        storage.local_file(f"{bucket}/export/none.gguf", cache)


def test_processes_copying_one_uri_at_once_download_it_once(bucket, tmp_path, monkeypatch):
    """The ranks on one node resuming from the same checkpoint: one downloads it, the others wait
    for its copy and take it (each used to download the whole checkpoint at once)."""
    import threading
    import time

    src = _folder(tmp_path)
    uri = f"{bucket}/run/checkpoint_step_0000003"
    storage.upload_folder(str(src), uri)
    real, calls = storage.pafs.copy_files, []

    def slow_copy(*a, **k):
        calls.append(1)
        time.sleep(0.3)  # long enough for every other caller to be waiting
        return real(*a, **k)

    monkeypatch.setattr(storage.pafs, "copy_files", slow_copy)
    cache, got = str(tmp_path / "cache"), []
    ranks = [threading.Thread(target=lambda: got.append(storage.local_copy(uri, cache))) for _ in range(4)]
    for t in ranks:
        t.start()
    for t in ranks:
        t.join()
    assert len(got) == 4 and len(set(got)) == 1 and len(calls) == 1
    assert open(os.path.join(got[0], "sub", "x.txt")).read() == "nested"


def test_the_cache_makes_room_for_a_copy_and_says_when_it_cannot(bucket, tmp_path, monkeypatch, caplog):
    """Copies of other URIs go, least recently used first, to keep the cache under
    CERBERO_CACHE_MAX_GB and 1 GiB free on its disk; never one used in the last 10 minutes or one
    another process is copying. When that is not room enough: one error before any download."""
    import fcntl
    import hashlib
    import logging
    import time

    caplog.set_level(logging.INFO, logger="cerbero_ray")
    src, cache = _folder(tmp_path), str(tmp_path / "cache")
    uris = {n: storage.upload_folder(str(src), f"{bucket}/{n}/hf") for n in ("a", "b", "c", "d")}
    per_copy = 100_000 + 100
    monkeypatch.setenv(storage.CACHE_MAX_ENV, str(2.5 * per_copy / 2**30))  # room for two copies
    a, b = storage.local_copy(uris["a"], cache), storage.local_copy(uris["b"], cache)
    hour_ago = time.time() - 3600
    os.utime(a, (hour_ago - 60, hour_ago - 60))
    os.utime(b, (hour_ago, hour_ago))
    c = storage.local_copy(uris["c"], cache)  # a, the least recently used, makes room
    assert not os.path.exists(a) and os.path.exists(b) and os.path.exists(c)
    assert any("deleted 1 older copy" in r.getMessage() and uris["c"] in r.getMessage() for r in caplog.records)
    # b is idle but being copied by another process: kept; c was used a moment ago: kept
    key_b = hashlib.sha256(uris["b"].encode()).hexdigest()[:16]
    with open(os.path.join(cache, f".{key_b}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(
            ValueError, match=rf"copying {uris['d']} needs 0\.00 GB in the cache {cache}; the cache holds"
        ):
            storage.local_copy(uris["d"], cache)
    assert os.path.exists(b) and os.path.exists(c) and storage.local_copy(uris["c"], cache) == c
    copies = sorted(n for n in os.listdir(cache) if not n.startswith("."))  # beside the lock files
    assert copies == sorted([os.path.basename(b), os.path.basename(c)])  # nothing of d was downloaded
    d = storage.local_copy(uris["d"], cache)  # the lock released: b goes
    assert os.path.exists(d) and not os.path.exists(b)
    # a disk nearly full: the same error, by its free space
    monkeypatch.delenv(storage.CACHE_MAX_ENV)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda p: shutil_usage(free=2**30 + per_copy // 2))
    with pytest.raises(
        ValueError, match=r"GB free on its disk \(1 GB kept free\), after deleting the copies unused for 10 min"
    ):
        storage.local_copy(uris["a"], cache)
    monkeypatch.setenv(storage.CACHE_MAX_ENV, "lots")
    with pytest.raises(ValueError, match="CERBERO_CACHE_MAX_GB='lots': a number of GB"):
        storage.local_copy(uris["a"], cache)


def shutil_usage(free: int):
    import collections

    return collections.namedtuple("usage", "total used free")(10 * free, 9 * free, free)


def test_a_part_of_a_folder_is_copied_as_its_own_entry(bucket, tmp_path):
    """``local_copy(only=…, part=…)``: the files asked for, under a name of its own, beside the
    other parts of the same version (another machine's ranks, on a shared cache); every part goes
    when the URI holds something else."""
    src = _folder(tmp_path)
    (src / "hf").mkdir()
    (src / "hf" / "model.safetensors").write_bytes(b"w" * 5000)
    uri = storage.upload_folder(str(src), f"{bucket}/run/checkpoint_step_0000002")
    cache = str(tmp_path / "cache")

    def copied(d):
        return sorted(os.path.relpath(os.path.join(r, f), d) for r, _, fs in os.walk(d) for f in fs)

    a = storage.local_copy(uri, cache, only=lambda n: not n.startswith("hf/"), part="a")
    b = storage.local_copy(uri, cache, only=lambda n: n.startswith("sub/"), part="b")
    assert copied(a) == [".cerbero-complete", ".complete", "config.json", "model.safetensors", "sub/x.txt"]
    assert copied(b) == [".complete", "sub/x.txt"] and os.path.exists(a)
    assert storage.local_copy(uri, cache, only=lambda n: False, part="a") == a  # cached: by its name
    (src / "config.json").write_text('{"model_type": "mistral", "again": 1}')
    storage.upload_folder(str(src), uri)
    c = storage.local_copy(uri, cache, only=lambda n: n == "config.json", part="a")
    assert copied(c) == [".complete", "config.json"] and not os.path.exists(a) and not os.path.exists(b)


def test_a_cached_copy_of_a_uri_folder(bucket, tmp_path):
    """Every stage that loads a checkpoint from a URI goes through this (it failed: the cache
    folder was never created)."""
    src = _folder(tmp_path)
    storage.upload_folder(str(src), f"{bucket}/run/hf")
    cache = str(tmp_path / "cache" / "deeper")
    local = storage.local_copy(f"{bucket}/run/hf", cache)
    assert open(os.path.join(local, "sub", "x.txt")).read() == "nested"
    assert os.path.getsize(os.path.join(local, "model.safetensors")) == 100_000
    assert storage.local_copy(f"{bucket}/run/hf", cache) == local  # cached
    assert [n for n in os.listdir(cache) if n.startswith(".download-")] == []
    storage.write_bytes(f"{bucket}/cut/hf/{storage.WRITING}", b"")
    storage.write_bytes(f"{bucket}/cut/hf/config.json", b"{}")
    with pytest.raises(ValueError, match="incomplete"):
        storage.local_copy(f"{bucket}/cut/hf", cache)


@pytest.fixture
def proxy(s3_server, monkeypatch):
    """The fault proxy in front of the S3 server, as this process's endpoint."""
    p = FaultProxy(S3_PORT).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
    storage._s3.cache_clear()
    yield p
    p.stop()
    storage._s3.cache_clear()


def test_slowdowns_dropped_connections_and_stalls_are_retried(bucket, proxy):
    data = {"rows": list(range(1000))}
    storage.write_json(f"{bucket}/a.json", data)  # the client is warm: faults hit real requests
    for kind, times, seconds in (("slowdown", 3, 0), ("drop", 3, 0), ("stall", 2, 2.0)):
        proxy.inject(kind, times, seconds)
        storage.write_json(f"{bucket}/{kind}.json", data)
        assert storage.read_json(f"{bucket}/{kind}.json") == data
        assert proxy.seen[kind] == times, proxy.seen


def test_an_endpoint_that_is_gone_is_an_error_naming_the_uri(bucket, proxy, monkeypatch):
    monkeypatch.setenv("CERBERO_S3_MAX_ATTEMPTS", "2")
    storage._s3.cache_clear()
    storage.write_json(f"{bucket}/warm.json", {})
    proxy.down(True)
    with pytest.raises(OSError, match=f"{bucket[5:]}/x.json"):
        storage.write_json(f"{bucket}/x.json", {"a": 1})
    proxy.down(False)
    storage.write_json(f"{bucket}/x.json", {"a": 1})  # the same call, once it is back
    assert storage.read_json(f"{bucket}/x.json") == {"a": 1}


def test_what_we_write_is_what_s3fs_reads(bucket):
    """The other client users reach a bucket with (fsspec/s3fs, pandas, datasets): it sees our files
    whole, and no temporary."""
    s3fs = pytest.importorskip("s3fs")
    storage.write_json(f"{bucket}/run/manifest.json", {"rows": 3})
    fs = s3fs.S3FileSystem()  # AWS_ENDPOINT_URL, as for every client
    assert json.loads(fs.cat(f"{bucket[5:]}/run/manifest.json")) == {"rows": 3}
    listed = fs.ls(f"{bucket[5:]}/run")  # (pyarrow may leave an empty "run/" folder marker: not a file)
    assert f"{bucket[5:]}/run/manifest.json" in listed and not any(x.endswith(".tmp") for x in listed)
