"""Every shipped config composes against its schema; bad keys and values fail early."""

import glob
import os

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from cerbero_ray.config import REPO_DIR, check, compose, to_container
from cerbero_ray.config.data import SourceConfig
from cerbero_ray.config.stages import STAGES

CONF = os.path.join(REPO_DIR, "conf")


def group_options(group):
    return sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(CONF, group, "*.yaml")))


GROUPS = ["cluster", "paths", "tokenizer", "data", "model", "deepspeed", "train", "label/task"]


def stage_groups():
    """The (stage, config group) pairs that exist: the groups each stage's primary config uses."""
    for stage in sorted(STAGES):
        primary = yaml.safe_load(open(os.path.join(CONF, f"{stage}.yaml")))
        for group in GROUPS:
            if any(isinstance(d, dict) and group in d for d in primary["defaults"]):
                yield stage, group


@pytest.mark.parametrize("stage,group", list(stage_groups()))
def test_every_option_composes(stage, group, tmp_path):
    """Every option of every group each stage uses composes and passes its stage's check. An option
    whose inputs are in ``paths.data_dir`` (``../shared/data``) is refused when that folder is not
    there, rightly: the others are checked, then the test is skipped naming them."""
    data_dir = compose(stage).paths.data_dir
    need_shared = []
    for option in group_options(group):
        extra = [f"model.path={tmp_path}"] if (group, option) == ("model", "hf") else []
        (tmp_path / "config.json").write_text("{}")  # a checkpoint for the stages that read one
        (tmp_path / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")  # no tensors
        extra += [f"{s}.checkpoint={tmp_path}" for s in ("label", "generate", "serve", "export") if s == stage]
        extra += (
            [f"evaluate.checkpoints.tiny-cpu={tmp_path}", "evaluate.skip_missing=true"] if stage == "evaluate" else []
        )
        try:
            c = check(stage, compose(stage, [f"{group}={option}", *extra]))
        except ValueError as e:
            if os.path.isdir(data_dir) or f"no such file or folder: {data_dir}" not in str(e):
                raise
            need_shared.append(option)
            continue
        assert isinstance(c, STAGES[stage].schema)  # what run_<stage> gets: the schema's dataclass, every key set
        if stage in ("data", "recipe"):
            assert all(os.path.isabs(s.path) or "://" in s.path for s in c.data.sources.values())
    if need_shared:
        pytest.skip(f"{group}={need_shared} read {data_dir}, which is not there (the rest composed)")


def test_misspelled_key_fails_at_compose(tmp_path):
    with pytest.raises(ConfigCompositionException):
        compose("data", ["data.seq_lenn=4096"])
    # a user's own config file with a typo, at any depth, is refused by the schema
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "typo.yaml").write_text("defaults:\n  - chat_sample\n  - _self_\nseq_lenn: 4096\n")
    (tmp_path / "data" / "typo2.yaml").write_text(
        "defaults:\n  - chat_sample\n  - _self_\nsources:\n  chat:\n    wieght: 2\n"
    )
    with pytest.raises(ConfigCompositionException, match="seq_lenn"):
        compose("data", [f"hydra.searchpath=[file://{tmp_path}]", "data=typo"])
    # inside a source (a free mapping, so that sources can be added from the command line): the
    # check that runs before Ray starts names it
    with pytest.raises(ValueError, match=r"data\.sources\.chat: unknown key\(s\) \['wieght'\]"):
        compose("data", [f"hydra.searchpath=[file://{tmp_path}]", "data=typo2"], checked=True)


def test_a_source_can_be_added_from_the_command_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ciao"}\n')
    c = check("data", compose("data", [f"+data.sources.extra.path={tmp_path}/x.jsonl", "+data.sources.extra.weight=2"]))
    assert c.data.sources["extra"] == SourceConfig(f"{tmp_path}/x.jsonl", format="auto", weight=2, text_field="text")
    assert set(c.data.sources) == {"chat", "extra"}
    for over, key in (
        ("+data.sources.bad.weight=2", "data.sources.bad.path"),
        ("+data.sources.bad={path: x, format: csv}", "data.sources.bad.format"),
        (f"+data.sources.bad.path={tmp_path}/missing.jsonl", "data.sources.bad.path: no such file or folder"),
    ):
        with pytest.raises(ValueError, match=key):
            compose("data", [over], checked=True)


def test_types_are_checked():
    with pytest.raises(Exception, match="seq_len"):
        compose("data", ["data.seq_len=lots"])


@pytest.mark.parametrize(
    "key,value",
    [
        ("loss_on", "users"),
        ("packing", "tight"),
        ("long_docs", "keep"),
        ("dedup", "minhash"),
        ("seq_len", 4),
        ("buffer_docs", 0),
    ],
)
def test_bad_values_name_the_key(key, value):
    c = to_container(compose("data"))
    c["data"][key] = value
    with pytest.raises(ValueError, match=f"data.{key}"):
        check("data", c)


def test_env_moves_outputs(monkeypatch, tmp_path):
    monkeypatch.setenv("CERBERO_OUTPUT_DIR", str(tmp_path))
    c = to_container(compose("recipe"))
    assert c["data"]["output_dir"] == f"{tmp_path}/data/chat_sample"
    assert (
        c["stages"] is None  # every recipe stage, from the stage table (tests/test_stages.py)
        and c["train"]["data_dir"] == c["data"]["output_dir"]
        and c["model"]["_target_"] == "cerbero_ray.models.tiny"
    )
    run = f"{tmp_path}/train/tiny-cpu"
    assert c["label"]["checkpoint"] == c["export"]["checkpoint"] == f"{run}/hf"
    # one override trains an adapter, and every later stage takes it
    lora = to_container(compose("recipe", ["train.method=lora"]))
    assert lora["label"]["checkpoint"] == lora["export"]["checkpoint"] == f"{run}/adapter"
    assert lora["evaluate"]["checkpoints"]["trained"] == f"{run}/adapter"


def test_model_builders_follow_config():
    from cerbero_ray.models import build_model, mistral_7b_config

    m = build_model(to_container(compose("recipe"))["model"])
    assert m.config.vocab_size == 32000 and sum(p.numel() for p in m.parameters()) < 10_000_000
    c = mistral_7b_config()
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_key_value_heads, c.sliding_window) == (
        4096,
        14336,
        32,
        8,
        4096,
    )
    with pytest.raises(ValueError, match="model.path"):
        build_model({"_target_": "cerbero_ray.models.from_pretrained", "path": None})


def test_from_pretrained_loads_a_local_folder(tmp_path):
    from cerbero_ray.models import build_model, tiny

    tiny().save_pretrained(tmp_path)
    m = build_model({"_target_": "cerbero_ray.models.from_pretrained", "path": str(tmp_path), "dtype": "float32"})
    assert m.config.hidden_size == 64


def test_cluster_yaml_parses_and_names_h100_workers():
    c = yaml.safe_load(open(os.path.join(REPO_DIR, "cluster.yaml")))
    assert c["available_node_types"]["h100"]["node_config"]["InstanceType"] == "p5.48xlarge"
    assert c["head_node_type"] == "head" and c["max_workers"] >= c["available_node_types"]["h100"]["max_workers"]
    assert any("pip install -e" in cmd and "cerbero-ray" in cmd for cmd in c["setup_commands"])


def test_kuberay_rayjob_parses_and_its_command_composes():
    job = yaml.safe_load(open(os.path.join(REPO_DIR, "deploy", "rayjob.yaml")))
    assert job["kind"] == "RayJob" and job["apiVersion"] == "ray.io/v1"
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8"
    words = job["spec"]["entrypoint"].split()
    assert words[:2] == ["python", "/home/ray/cerbero-ray/jobs/train.py"]
    c = check("train", compose("train", words[2:]))
    assert c.train.num_workers == 8 and c.train.use_gpu and c.train.precision == "bf16"
    assert c.deepspeed.stage == 1 and c.train.seq_len == 8192


def test_run_code_gets_the_typed_schema_with_every_default(tmp_path):
    """A config handed to run_<stage> as plain dicts (a user's, a test's) comes out as the stage's
    dataclass with the schema's defaults filled in; a wrong type or an unknown key is a ValueError
    naming the key; a checked config is not checked again; the recipe's config is each stage's."""
    from cerbero_ray.config import checked_for
    from cerbero_ray.config.label import LabelStageConfig

    ck = tmp_path / "hf"
    c = to_container(compose("export", [f"export.checkpoint={ck}", f"export.output_dir={tmp_path}/out"]))
    del c["export"]["threads"], c["export"]["verify"]  # a hand-written config that leaves defaults out
    ck.mkdir()
    (ck / "config.json").write_text("{}")
    (ck / "model.safetensors").write_bytes((2).to_bytes(8, "little") + b"{}")
    x = check("export", c)
    assert (x.export.threads, x.export.verify) == (0, True) and x.cluster.num_cpus is None
    assert check("export", x) is x and checked_for(x) == {"export"}
    for bad, key in (("threads", "export.threads"), ("colour", "export.colour")):
        with pytest.raises(ValueError, match=key):
            check("export", {**c, "export": {**c["export"], bad: "many"}})
    r = check("recipe", compose("recipe", [f"paths.output_dir={tmp_path}"]))
    label = check("label", r)  # what run_recipe hands run_label: checked already, sections shared
    assert isinstance(label, LabelStageConfig) and label.label is r.label and "label" in checked_for(label)


def test_the_metrics_port_reaches_the_embedded_cluster(monkeypatch):
    """``cluster.metrics_export_port`` is where Ray's metrics agent (and the server's metrics) is
    scraped on an embedded cluster: handed to ``ray.init``; a value that is not a port is named."""
    import ray

    from cerbero_ray import cluster as cluster_state
    from cerbero_ray.config.common import ClusterConfig
    from cerbero_ray.runtime import init_ray

    seen = {}
    was = cluster_state._EMBEDDED.get("here")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(kw))
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        init_ray(ClusterConfig(num_cpus=2, metrics_export_port=9464))
    finally:
        cluster_state.started_here(bool(was))
    assert seen["_metrics_export_port"] == 9464 and seen["num_cpus"] == 2
    c = to_container(compose("serve", ["cluster.metrics_export_port=9464"]))
    assert c["cluster"]["metrics_export_port"] == 9464
    with pytest.raises(ValueError, match=r"cluster.metrics_export_port must be a port \(1..65535\) or null, got 70000"):
        check("data", compose("data", ["cluster.metrics_export_port=70000"]))
    with pytest.raises(ValueError, match=r"cluster.num_cpus must be >= 1 or null, got 0"):
        check("data", compose("data", ["cluster.num_cpus=0"]))


def test_a_port_the_server_cannot_listen_on_is_one_line(tiny_hf, monkeypatch):
    """Out of range: before Ray starts. Held by another program, or a host that is not this
    machine's: on the embedded cluster, before Serve's proxy would fail to bind (a page of its
    tracebacks); an attached cluster's proxies listen on its nodes, so nothing is checked there."""
    import socket

    from cerbero_ray import cluster

    with pytest.raises(ValueError, match=r"serve.port must be a port \(1..65535\), got 70000"):
        check("serve", compose("serve", [f"serve.checkpoint={tiny_hf}", "serve.port=70000"]))
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        monkeypatch.setitem(cluster._EMBEDDED, "here", True)
        with pytest.raises(ValueError, match=rf"serve.port: cannot listen on 127.0.0.1:{port}: .*another server"):
            cluster.check_listen("127.0.0.1", port, "serve.port")
        with pytest.raises(ValueError, match=r"serve.host: cannot listen on 999.1.1.1:"):
            cluster.check_listen("999.1.1.1", port, "serve.host")
        monkeypatch.setitem(cluster._EMBEDDED, "here", False)
        cluster.check_listen("127.0.0.1", port, "serve.port")  # attached: not this machine's port
    monkeypatch.setitem(cluster._EMBEDDED, "here", True)
    cluster.check_listen("127.0.0.1", port, "serve.port")  # free again
