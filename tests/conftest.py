import atexit
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request

import pytest

from cerbero_ray.chat import SYSTEM_LINE
from cerbero_ray.config import REPO_DIR
from cerbero_ray.tokenizer import build_tokenizer

SHARED_DATA = os.environ.get("CERBERO_DATA_DIR", os.path.join(REPO_DIR, "..", "shared", "data"))


def _ephemeral() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _free_port():
    """A port free now and outside the kernel's ephemeral range: a port the kernel hands out (bind to
    0) can be taken as the source port of any outgoing connection before the server that was given it
    binds it (a Ray job agent then never came up: "address already in use", seen in a CI run)."""
    import random

    lo, hi = _ephemeral()
    for _ in range(200):
        port = random.randrange(20000, lo) if lo > 21000 else random.randrange(hi + 1, 65536)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # every try taken: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# An S3-protocol server on loopback (moto's), reached as users reach S3: through AWS_ENDPOINT_URL,
# which pyarrow, s3fs and boto3 honour. Set when the tests start, before any Ray cluster, so every
# worker and job the tests start inherits it; the server itself starts with the `s3` fixture.
S3_PORT = _free_port()
S3_SECRET = "cerbero-test-secret-7f3a9c"  # a test greps every output for it
S3_ENV = {
    "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}",
    "AWS_ACCESS_KEY_ID": "cerbero-test-key",
    "AWS_SECRET_ACCESS_KEY": S3_SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "CERBERO_S3_MAX_ATTEMPTS": "6",
}
os.environ.update(S3_ENV)
# Local copies of URIs go to a cache of this run's own (every worker and job inherits it), not the
# user's ~/.cache/cerbero_ray: a run never reads another's copies, and leaves none behind
_CACHE = tempfile.mkdtemp(prefix="cerbero-test-cache-")
os.environ["CERBERO_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
# Experiment trackers (train.tracker) never reach a server from a test: W&B runs offline into the
# run folder; MLflow is given a file store (its legacy backend, on opt-in) by the tests that use it
os.environ.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true"})
SAMPLES = os.path.join(REPO_DIR, "data", "samples")
# A GPU test's body runs on CPU too, in the default tier, with the same inputs and assertions (so a
# signature change breaks it in CI, which has no GPU); its CUDA run is the `gpu` tier's
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


# The longest files first (each 40 s to 2 min on 2 cores; every other file under 35 s): under the
# README's `-n 2` each worker takes whole files in this order, so the two end together instead of one
# running the main job alone at the end
LONGEST_FIRST = (
    "test_recipe.py",
    "test_s3.py",
    "test_train.py",
    "test_evaluate_pipeline.py",
    "test_serve_sigterm.py",
    "test_generate.py",
    "test_export.py",
    "test_submit.py",
    "test_label_extract.py",
    "test_label.py",
    "test_data_pipeline.py",
)


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(pytest.mark.skip(reason="needs CUDA"))
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under ``-n N`` (pytest-xdist) without another ``--dist``: whole files to a worker, so a module's
    fixtures (the main job's run, a Ray head) run once, handed out in the order above."""
    if config.getvalue("dist") != "load":
        return None
    from xdist.scheduler import LoadFileScheduling

    config.option.loadscopereorder = False
    return LoadFileScheduling(config, log)


@pytest.fixture(scope="session")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="session")
def ray_local():
    """One embedded 2-CPU Ray for the in-process integration tests."""
    from cerbero_ray.config.common import ClusterConfig
    from cerbero_ray.runtime import init_ray, shutdown_ray

    init_ray(ClusterConfig(num_cpus=2, dashboard=True))  # Ray Train polls the state API, which needs it
    yield
    shutdown_ray()


def proc_cfg(out, sources, **data):
    """The ``data`` section as plain dicts (``DataConfig``'s keys): for ``buffer_processor`` and ``data_stage``."""
    d = {
        "sources": sources,
        "seq_len": 512,
        "loss_on": "assistant",
        "packing": "whole",
        "long_docs": "split",
        "buffer_docs": 4096,
        "workers": None,
        "seed": 0,
        "compression": "zstd",
        "output_dir": str(out),
        "overwrite": False,
    }
    d.update(data)
    return d


TOKENIZER_CFG = {"path": None, "assistant_tag": "AI", "system_line": SYSTEM_LINE}


PATHS = {"repo_dir": REPO_DIR, "data_dir": SHARED_DATA, "output_dir": os.path.join(REPO_DIR, "outputs")}


def data_stage(out, sources, **data):
    """A whole data-stage config (plain dicts, as a user's would be) for run_data."""
    return {"paths": PATHS, "data": proc_cfg(out, sources, **data), "tokenizer": TOKENIZER_CFG}


def buffer_processor(out, sources, duplicates="", **data):
    """A BufferProcessor on sources given as SourceConfig keys (path optional: the rows come in
    batches); ``duplicates``: a dedup table's path."""
    from cerbero_ray.config.common import TokenizerConfig
    from cerbero_ray.config.data import DataConfig, SourceConfig
    from cerbero_ray.data.process import BufferProcessor

    d = proc_cfg(out, {k: SourceConfig(**{"path": "-", **s}) for k, s in sources.items()}, **data)
    return BufferProcessor(DataConfig(**d), TokenizerConfig(**TOKENIZER_CFG), duplicates=duplicates)


def counting_prefill(engine) -> list[int]:
    """The prompt tokens a continuous ``engine`` computes from now on, one entry per chunk."""
    real, lens = engine.slots.prefill, []
    engine.slots.prefill = lambda p, s, a=None: lens.extend(len(x) for x in p) or real(p, s, a)
    return lens


def write_jsonl(path, rows):
    with open(path, "wb") as f:
        for r in rows:
            f.write(r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode())
            f.write(b"\n")
    return str(path)


free_port = _free_port


def _own_ports():
    # every port its own: another cluster on this machine (the embedded one of other tests) holds
    # the defaults, and a job agent that cannot bind never comes up
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]


def _start(cmd, env):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def start_head(env, num_cpus):
    """``ray start --head --block`` on loopback in its own process group; waits for the dashboard.
    Its temporary folder is a short one of its own under /tmp, removed by ``stop_node``: Ray puts
    sockets there, whose paths may not exceed 107 bytes (pytest's folders under xdist are longer)."""
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    port, dash = free_port(), free_port()
    cmd = [
        "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dash}",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={temp}",
        "--include-dashboard=true",
        "--disable-usage-stats",
        f"--ray-client-server-port={free_port()}",
        *_own_ports(),
    ]
    proc = _start(cmd, env)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{address}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 with token auth: up, and refusing us as it should
            break
        except Exception:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_node({"procs": [proc], "temp": temp})  # its process group and its folder go too
                raise RuntimeError(f"ray head did not start: {proc.stdout.read().decode()[-2000:]}") from None
            time.sleep(1)
    return {"procs": [proc], "gcs": f"127.0.0.1:{port}", "dashboard": address, "env": env, "temp": str(temp)}


def add_worker_node(node, num_cpus, env=None):
    """A second raylet on loopback joining ``node``'s head (``env``: its own environment, e.g. its own
    temporary and cache folders); returns its process (a group of its own)."""
    cmd = [
        "ray",
        "start",
        "--block",
        f"--address={node['gcs']}",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={num_cpus}",
        f"--temp-dir={node['temp']}",
        "--disable-usage-stats",
        *_own_ports(),
    ]
    proc = _start(cmd, env or node["env"])
    node["procs"].append(proc)
    return proc


def stop_node(node):
    for proc in reversed(node["procs"]):
        if proc.poll() is not None:  # already gone (a test killed that node)
            continue
        os.killpg(proc.pid, signal.SIGTERM)
        try:  # a test's cluster holds nothing worth a graceful stop: `ray start` takes ~30 s for one
            proc.wait(1)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    shutil.rmtree(node["temp"], ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory, tok):
    """A tiny random Mistral saved as an HF folder with the cerbero tokenizer, as the trainer exports."""
    from cerbero_ray.models import tiny

    d = tmp_path_factory.mktemp("tiny_hf")
    tiny().save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@contextlib.contextmanager
def one_rank_group(monkeypatch, backend: str = "gloo"):
    """A torch.distributed group of one rank (what DeepSpeed needs outside a launcher)."""
    import torch.distributed as dist

    for k, v in dict(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0"
    ).items():
        monkeypatch.setenv(k, v)
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        yield
    finally:
        import deepspeed.utils.groups as ds_groups

        ds_groups._WORLD_GROUP = None  # DeepSpeed keeps a clone of the world group: gone with it
        dist.destroy_process_group()


def make_adapter(
    base_dir: str, dest: str, r: int, targets: list[str], seed: int, tok=None, b_scale: float = 20.0
) -> str:
    """A peft LoRA adapter on the HF folder ``base_dir`` with random A and B (peft starts B at zero:
    an adapter that changes nothing proves nothing), its base recorded as the trainer records it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from cerbero_ray.train.lora import make_record, save_adapter

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False)
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.mul_(b_scale)  # 20: an update of the size of the weights: greedy text changes
    save_adapter(pm, tok, make_record(base_dir, base_dir), dest)
    return dest


@pytest.fixture(scope="session")
def tiny_adapters(tiny_hf, tmp_path_factory, tok):
    """Two LoRA adapters on ``tiny_hf``: different ranks and target modules."""
    d = tmp_path_factory.mktemp("adapters")
    return {
        "sentiment-it": make_adapter(tiny_hf, str(d / "a"), 4, ["q_proj", "v_proj", "down_proj"], 10, tok),
        "toxicity-it": make_adapter(
            tiny_hf, str(d / "b"), 8, ["q_proj", "k_proj", "o_proj", "gate_proj", "up_proj", "lm_head"], 11
        ),
    }


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on ``S3_PORT`` for the whole run."""
    pytest.importorskip("moto.server", reason="needs moto[server] (the test extra)")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # not a line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=S3_PORT, verbose=False)
    server.start()
    yield S3_ENV["AWS_ENDPOINT_URL"]
    server.stop()


@pytest.fixture
def bucket(s3_server, request):
    """A new, empty bucket for one test: its ``s3://`` URI."""
    import re

    import boto3

    name = re.sub(r"[^a-z0-9-]", "-", f"t-{request.node.name.lower()}")[:50].strip("-") + f"-{_free_port()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


class _Replayed:
    """A CUDA graph's stand-in on the CPU: ``replay`` runs the captured body again (reading the
    tensors it closed over, as a replay reads its static inputs) and writes the results into the
    tensors the capture returned (as a replay rewrites its outputs in place)."""

    def __init__(self, body, out):
        self.body, self.out, self.replays = body, out, 0

    def replay(self):
        new = self.body(False)
        pairs = zip(self.out, new) if isinstance(self.out, tuple) else [(self.out, new)]
        for dst, src in pairs:
            if dst.data_ptr() != src.data_ptr():
                dst.copy_(src)
        self.replays += 1


@pytest.fixture
def cpu_graphs(monkeypatch):
    """``on(batcher)``: the continuous engine's captured-graph path on the CPU (every capture a
    :class:`_Replayed`), switched on and warmed as a GPU engine is at start-up: the graph keys,
    batch and length buckets, static buffers and in-place outputs run in CI, which has no GPU."""
    from cerbero_ray.inference.slots import SlotModel

    monkeypatch.setattr(
        SlotModel, "_capture_once", lambda self, body, compiled: (lambda o: (_Replayed(body, o), o))(body(compiled))
    )

    def on(cb):
        with cb.lock:
            cb.graphs = True
            cb.slots.warm()
        return cb

    return on


def wandb_records(run_folder) -> tuple[str, list]:
    """An offline W&B run's id and its protobuf records, read from the ``run-<id>.wandb`` file W&B
    writes under ``<run_folder>/wandb/`` (a LevelDB-style log: 32 KiB blocks of chunks, each a CRC,
    a length and a type)."""
    import glob
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(os.path.join(str(run_folder), "wandb", "offline-run-*", "run-*.wandb"))
    data, pos, chunk, records = open(path, "rb").read(), 7, b"", []  # 7: W&B's file header
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return os.path.basename(path)[len("run-") : -len(".wandb")], records


def _items(items) -> dict:
    return {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}


def wandb_history(run_folder) -> tuple[str, list[dict]]:
    """An offline W&B run's id and its history rows (``{"_step", key: value}``)."""
    run_id, records = wandb_records(run_folder)
    return run_id, [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]


def wandb_summary(run_folder) -> dict:
    """An offline W&B run's summary, as its updates leave it."""
    out: dict = {}
    for r in wandb_records(run_folder)[1]:
        if r.WhichOneof("record_type") == "summary":
            out.update(_items(r.summary.update))
    return out
