"""``runtime.launch``, what every job runs: what our code finds wrong is one line and exit status 2;
a failure inside a library keeps its stack; SIGTERM stops a job as Ctrl-C does."""

from __future__ import annotations

import json
import os
import signal

import pytest

from cerbero_ray.config import compose
from cerbero_ray.config.common import one_of
from cerbero_ray.runtime import STOPPED_BY, launch


def _cfg(tmp_path):
    return compose("data", [f"data.output_dir={tmp_path}/out"])


def test_an_error_our_code_raises_is_one_line(tmp_path, capsys):
    def run(c):
        one_of(c.data.packing, ("split",), "data.packing")  # a check of ours, raising from our code

    with pytest.raises(SystemExit) as e:
        launch("data", _cfg(tmp_path), run, ray=False)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data.packing must be one of ('split',), got 'whole'\n"


def test_a_library_error_keeps_its_stack(tmp_path, monkeypatch):
    def run(c):
        return json.loads("{not json")  # raised inside the json module: a bug, not a verdict on the input

    with pytest.raises(ValueError, match="Expecting property name"):
        launch("data", _cfg(tmp_path), run, ray=False)
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # and our own errors show their stack on request

    def ours(c):
        one_of(c.data.packing, ("split",), "data.packing")

    with pytest.raises(ValueError, match="data.packing"):
        launch("data", _cfg(tmp_path), ours, ray=False)


def test_sigterm_stops_a_job_as_ctrl_c_does(tmp_path, capsys):
    old = signal.getsignal(signal.SIGTERM)

    def run(c):  # launch has set the handler
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have stopped the run")

    try:
        with pytest.raises(SystemExit) as e:
            launch("data", _cfg(tmp_path), run, ray=False)
    finally:
        signal.signal(signal.SIGTERM, old)
        STOPPED_BY.clear()
    assert e.value.code == 128 + signal.SIGTERM
    assert capsys.readouterr().err == (
        "[data] stopped by SIGTERM; the same command resumes: finished buffers are kept\n"
    )


def _check_packing(packing: str) -> None:
    one_of(packing, ("split",), "data.packing")  # a check of ours, raising from our code


@pytest.mark.integration
def test_a_check_of_ours_in_a_ray_task_is_one_line_and_a_library_error_there_keeps_its_stack(
    tmp_path, capsys, ray_local
):
    """The remote traceback is read back to its message (a model actor whose start a check stopped:
    tests/test_generate.py)."""
    import ray

    def task(c):
        ray.get(ray.remote(one_of).options(num_cpus=0).remote(c.data.packing, ("split",), "data.packing"))

    with pytest.raises(SystemExit) as e:
        launch("data", _cfg(tmp_path), task, ray=False)
    assert e.value.code == 2
    assert capsys.readouterr().err == "error: data.packing must be one of ('split',), got 'whole'\n"

    def library(c):
        ray.get(ray.remote(json.loads).options(num_cpus=0).remote("{not json"))

    with pytest.raises(ValueError, match="Expecting property name"):
        launch("data", _cfg(tmp_path), library, ray=False)


def test_our_error_reads_only_a_traceback_that_ends_in_our_code():
    import traceback

    from cerbero_ray.logs import our_error

    def formatted(fn) -> str:
        try:
            fn()
        except Exception:
            return traceback.format_exc()
        raise AssertionError("it should have raised")

    assert our_error(formatted(lambda: _check_packing("whole"))) == (
        "data.packing must be one of ('split',), got 'whole'"
    )
    assert our_error(formatted(lambda: json.loads("{not json"))) is None  # raised in the json module
    assert our_error(formatted(lambda: {}["key"])) is None  # not a kind our checks raise
    assert our_error("ValueError: no traceback around it") is None and our_error("") is None


def test_the_train_stage_s_local_data_is_checked_before_ray_starts(tmp_path, monkeypatch, capsys):
    """The stage table's precheck: a local train.data_dir without a manifest, with one cut short or
    not the data stage's, with too few rows or rows of another length is one line and exit status 2
    before Ray starts (the job, and the main
    job when its data stage does not run first); the main job whose data stage makes the manifest,
    a whole manifest and a bucket's folder (read when the run plans) go on to start Ray."""
    import re

    from test_train_config import manifest_dir

    import cerbero_ray.runtime as runtime

    class RayStarts(Exception):
        pass

    def init_ray(cluster):
        raise RayStarts

    monkeypatch.setattr(runtime, "init_ray", init_ray)
    out = f"paths.output_dir={tmp_path}"
    (tmp_path / "few").mkdir()
    few = manifest_dir(tmp_path / "few", rows=6)
    for name, text in (("cut", '{"seq_len": 5'), ("foreign", '{"rows": 3}'), ("odd", '{"seq_len": 512, "shards": 1}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(text)
    for stage, over, said in (
        ("train", [f"train.data_dir={tmp_path}/nothing"], r"train\.data_dir: no manifest\.json in .*nothing"),
        ("train", [f"train.data_dir={few}"], r"train\.global_batch_size \+ train\.eval_rows = 12 rows, but .* holds 6"),
        ("train", [f"train.data_dir={few}", "train.seq_len=256"], r"train\.seq_len=256 but the shards in .* are 512"),
        ("recipe", ["stages=[train,label]"], r"train\.data_dir: no manifest\.json in .*data/chat_sample"),
        ("train", [f"train.data_dir={tmp_path}/cut"], r"train\.data_dir: .*cut/manifest\.json is not JSON \(.*"),
        ("train", [f"train.data_dir={tmp_path}/foreign"], r"train\.data_dir: .*foreign/manifest\.json is not a data"),
        ("train", [f"train.data_dir={tmp_path}/odd"], r"train\.data_dir: .*odd/manifest\.json is not a data"),
    ):
        with pytest.raises(SystemExit) as e:
            launch(stage, compose(stage, [out, *over]), lambda c: None)
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.fullmatch(f"error: {said}.*\n", err), err
    for stage, over in (
        ("recipe", ["stages=[data,train]"]),
        ("train", [f"train.data_dir={manifest_dir(tmp_path)}"]),
        ("train", ["train.data_dir=s3://bucket/run/data"]),
    ):
        with pytest.raises(RayStarts):
            launch(stage, compose(stage, [out, *over]), lambda c: None)


def test_a_batch_stage_s_output_folder_holding_another_run_is_refused_before_ray_starts(
    tmp_path, tiny_hf, monkeypatch, capsys
):
    """The label and generate stages' precheck: the run record in their output folder against this
    run's (another task or settings; the checkpoint or the input written again since) is one line and exit 2
    before Ray starts; the same run, overwrite, or the main job training the checkpoint first go
    on to start Ray."""
    import re
    import shutil

    import cerbero_ray.runtime as runtime
    from cerbero_ray import storage
    from cerbero_ray.batchjob import claim_output
    from cerbero_ray.config import check
    from cerbero_ray.generate.pipeline import RUN_FILE as GENERATE_RUN
    from cerbero_ray.generate.pipeline import run_identity as generate_identity
    from cerbero_ray.label.pipeline import RUN_FILE as LABEL_RUN
    from cerbero_ray.label.pipeline import resolve_task
    from cerbero_ray.label.pipeline import run_identity as label_identity

    class RayStarts(Exception):
        pass

    def init_ray(cluster):
        raise RayStarts

    monkeypatch.setattr(runtime, "init_ray", init_ray)
    ck = tmp_path / "hf"
    shutil.copytree(tiny_hf, ck)
    storage.mark_complete(str(ck))  # as training writes a model
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "Ciao"}\n')
    label = [f"label.checkpoint={ck}", f"label.input={tmp_path}/in.jsonl", f"label.output_dir={tmp_path}/labels"]
    gen = [f"generate.checkpoint={ck}", f"generate.input={tmp_path}/in.jsonl", f"generate.output_dir={tmp_path}/gen"]
    lc = check("label", compose("label", label)).label
    claim_output(lc.output_dir, LABEL_RUN, label_identity(lc, resolve_task(lc)), False, "label")
    gc = check("generate", compose("generate", gen)).generate
    claim_output(gc.output_dir, GENERATE_RUN, generate_identity(gc), False, "generate")
    for stage, over in (("label", label), ("generate", gen), ("label", [*label, "label.overwrite=true"])):
        with pytest.raises(RayStarts):  # the same run resumes
            launch(stage, compose(stage, over), lambda c: None)
    # the input written since the run began: a grown file's new last chunk would label its old
    # last chunk's rows a second time, a file edited in place keep labels of rows it no longer holds
    from cerbero_ray import inputs
    from cerbero_ray.batchjob import INPUT_VERSION

    def claim_as_run():  # the record start_run writes: with the input's stamp
        ident = {**label_identity(lc, resolve_task(lc)), INPUT_VERSION: inputs.stamp([lc.input])[1]}
        claim_output(lc.output_dir, LABEL_RUN, ident, True, "label")

    claim_as_run()
    with pytest.raises(RayStarts):  # unchanged: resumes
        launch("label", compose("label", label), lambda c: None)
    with open(tmp_path / "in.jsonl", "a") as f:
        f.write('{"id": "b", "text": "Ancora"}\n')
    with pytest.raises(SystemExit) as e:
        launch("label", compose("label", label), lambda c: None)
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"labels holds a label run of label.input ({lc.input}) as its files were: " in err
    from cerbero_ray.batchjob import INPUT_CONTENT

    ident = {**label_identity(lc, resolve_task(lc)), INPUT_VERSION: "then", INPUT_CONTENT: "its-bytes"}
    claim_output(lc.output_dir, LABEL_RUN, ident, True, "label")
    with pytest.raises(RayStarts):  # a record of a line file's bytes: the run compares them once it reads them
        launch("label", compose("label", label), lambda c: None)
    claim_as_run()  # a run of the file as it is now
    storage.mark_complete(str(ck))  # trained again under the same path
    for stage, over, said in (
        ("label", label, r".*labels holds a label run of .*hf as it was before: it was written again since"),
        ("generate", gen, r".*gen holds a generate run of .*hf as it was before"),
        ("generate", [*gen, "generate.sampling.temperature=0.5"], r".*gen holds a generate run with other settings "),
    ):
        with pytest.raises(SystemExit) as e:
            launch(stage, compose(stage, over), lambda c: None)
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.fullmatch(f"error: {said}.*\n", err), err
    with pytest.raises(RayStarts):  # the main job trains the checkpoint first: its label stage decides then
        launch(
            "recipe",
            compose("recipe", [f"paths.output_dir={tmp_path}", *label[1:], "stages=[data,train,label]"]),
            lambda c: None,
        )
    # the other batch stage's output folder: its parts would mix with the run's and its summary be
    # written over (a label run there counted generate's parts as its rows, 214 for 107, and replaced
    # generate's summary.json); overwrite deletes no other stage's output, so it is refused too
    for stage, over, other in (
        ("label", [*label[:2], f"label.output_dir={tmp_path}/gen"], "generate"),
        ("generate", [*gen[:2], f"generate.output_dir={tmp_path}/labels", "generate.overwrite=true"], "label"),
    ):
        with pytest.raises(SystemExit) as e:
            launch(stage, compose(stage, over), lambda c: None)
        err = capsys.readouterr().err
        assert e.value.code == 2 and f"holds a {other} run ({other}_run.json): this {stage} run's parts" in err, err
        with pytest.raises(FileExistsError, match=f"holds a {other} run"):  # and in the job, the main job's too
            ident = (label_identity(lc, resolve_task(lc)), generate_identity(gc))[stage == "generate"]
            claim_output(over[2].split("=", 1)[1], (LABEL_RUN, GENERATE_RUN)[stage == "generate"], ident, True, stage)
    # a folder holding what a batch stage writes, of no run of this stage: a training run's summary
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        launch("label", compose("label", [*label[:2], f"label.output_dir={tmp_path}/run"]), lambda c: None)
    assert "run holds summary.json of no label run (another job's output" in capsys.readouterr().err


_EACH = """
import sys
from cerbero_ray.config import compose
from cerbero_ray.config.stages import STAGES
from cerbero_ray.runtime import launch
bad = {bad}
for stage, over in bad:
    try:
        launch(stage, compose(stage, over))
    except SystemExit as e:
        assert e.code == 2, (stage, e.code)
    else:
        raise AssertionError(stage)
print(len(bad), [m for m in ("torch", "transformers", "ray") if m in sys.modules])
"""


def _launch_each(bad: str, env: dict | None = None) -> tuple[int, str, list[str]]:
    """In a fresh interpreter, ``launch`` of each (stage, overrides) the expression ``bad`` lists
    (``STAGES`` in scope): each must exit 2. Returns how many, the heavy modules imported, and the
    lines written to stderr."""
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _EACH.format(bad=bad)], capture_output=True, text=True, timeout=120, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    count, imported = r.stdout.split(" ", 1)
    return int(count), imported.strip(), r.stderr.splitlines()


def test_a_config_error_is_reported_before_any_stage_module_is_imported():
    """A stage's run_<stage> module may import torch and transformers (seconds on a small machine):
    ``launch`` resolves it only after the checks, so a bad value is one line at once, for every stage."""
    bad = '[(s, ["export.types=[nope]"] if s == "export" else ["cluster.num_cpus=0"]) for s in STAGES]'
    stages, imported, lines = _launch_each(bad)
    assert imported == "[]", imported  # none of them imported
    assert len(lines) == stages >= 8 and all(x.startswith("error: ") for x in lines), lines  # one line each


def test_a_blank_output_or_data_folder_is_refused_before_anything_is_written(tmp_path):
    """``CERBERO_OUTPUT_DIR=$UNSET`` (or ``paths.output_dir=``) would put every stage's folder at the
    filesystem's root (/data, /train, /label, /export: seen before this check); every stage refuses
    it with one line and exit 2, as a blank data folder and a stage's own blank output folder."""
    out = f"paths.output_dir={tmp_path}"
    more = [("recipe", [out, "paths.data_dir=' '"]), ("train", [out, "train.output_dir=''"])]
    bad = f"[(s, []) for s in STAGES] + {more!r}"
    count, _, lines = _launch_each(bad, {**os.environ, "CERBERO_OUTPUT_DIR": ""})
    assert len(lines) == count >= 10, lines  # one line each
    blank = "error: paths.output_dir is empty (is $CERBERO_OUTPUT_DIR set to an empty value?)"
    assert all(x.startswith(blank) for x in lines[:-2]), lines
    assert lines[-2].startswith("error: paths.data_dir is empty (is $CERBERO_DATA_DIR set to an empty value?)")
    assert lines[-1] == "error: train.output_dir is empty: give a folder or a URI"
    assert os.listdir(tmp_path) == []


def test_a_resource_share_ray_cannot_schedule_is_refused_before_ray_starts(tmp_path):
    """Under 0.0001 of a CPU or GPU (or below 0) Ray stops the job with a traceback about "precision"
    once the actors start: refused at config time naming the key (0 GPUs is no GPU: fine)."""
    from cerbero_ray.config import check, compose
    from cerbero_ray.config.common import check_share

    label = [f"paths.output_dir={tmp_path}", f"label.checkpoint={tmp_path}"]
    for over, says in (
        ("label.cpus_per_worker=0.00001", r"label.cpus_per_worker must be at least 0.0001 .*got 1e-05"),
        ("label.cpus_per_worker=0", r"label.cpus_per_worker must be at least 0.0001"),
        ("label.gpus_per_worker=0.00001", r"label.gpus_per_worker must be 0 or at least 0.0001"),
        ("label.gpus_per_worker=-1", r"label.gpus_per_worker must be 0 or at least 0.0001"),
    ):
        with pytest.raises(ValueError, match=says):
            check("label", compose("label", [*label, over]))
    with pytest.raises(ValueError, match="serve.cpus_per_replica must be 0 or at least 0.0001"):
        check("serve", compose("serve", [f"serve.checkpoint={tmp_path}", "serve.cpus_per_replica=-0.5"]))
    with pytest.raises(ValueError, match="label.checkpoint"):  # 0 GPUs and a small CPU share pass: the next check
        check("label", compose("label", [*label, "label.gpus_per_worker=0", "label.cpus_per_worker=0.0001"]))
    for ok in (1e-4, 0.5, 8):  # each passes (a refusal raises)
        check_share(ok, "x")
    check_share(0, "x", zero_ok=True)
    with pytest.raises(ValueError, match="x must be at least 0.0001"):
        check_share(0, "x")


def test_a_negative_data_seed_is_refused_before_ray_starts(tmp_path):
    """numpy's generators refuse a negative seed: the data stage's shuffle stopped with a traceback
    once its actors ran (the training and evaluation seeds: their stages' config tests)."""
    from cerbero_ray.config import compose

    with pytest.raises(ValueError, match="data.seed must be >= 0, got -2"):
        compose("data", [f"paths.output_dir={tmp_path}", "data.seed=-2"], checked=True)
    compose("data", [f"paths.output_dir={tmp_path}", "data.seed=7"], checked=True)


def test_a_uri_no_storage_here_reads_is_refused_naming_the_key(tmp_path):
    """An https:// link or Hadoop's s3a:// as an input, a checkpoint or an output folder stopped the
    job with pyarrow's "Unrecognized filesystem type" traceback after Ray started; refused at config
    time naming the key (and by storage itself, for a path no config check saw)."""
    from cerbero_ray import storage
    from cerbero_ray.config import compose

    out = f"paths.output_dir={tmp_path}"
    for stage, over, says in (
        ("label", ["label.input=https://example.com/x.jsonl"], r"label.input: https://example.com/x.jsonl: https://"),
        ("label", ["label.checkpoint=https://h/hf"], r"label.checkpoint: https://h/hf: https:// is not a storage"),
        ("data", ["data.sources.chat.path=s3a://b/x.jsonl"], r"data.sources.chat.path: .*: write it s3://b/x.jsonl$"),
        ("train", ["train.output_dir=ftp://h/runs"], r"train.output_dir: ftp://h/runs: ftp:// is not a storage"),
    ):
        with pytest.raises(ValueError, match=says):
            compose(stage, [out, *over], checked=True)
    with pytest.raises(ValueError, match=r"^http://h/x.jsonl: http:// is not a storage this platform reads"):
        storage.resolve("http://h/x.jsonl")
    for ok in ("s3://b/x", "gs://b/x", "abfss://c@a.dfs.core.windows.net/x"):
        storage.check_scheme(ok, "k")  # a refusal raises


def test_a_folder_uri_with_a_trailing_slash_makes_no_doubled_slash():
    """``paths.output_dir=s3://b/run/`` interpolates to ``s3://b/run//data/...``: a key no one named
    (pyarrow refused it: ArrowInvalid "Empty path component"; a printed ``aws s3 cp`` of it found
    nothing). The typed config writes every object-store URI with single slashes; a web address
    (an evaluated endpoint) is left as given."""
    from cerbero_ray.config import check, compose, typed

    over = ["paths.output_dir=s3://b/run/", "train.output_dir=gs://g//t/", "+evaluate.checkpoints.web=http://h//v1"]
    over += ["train.tracker.uri=sqlite:////abs/mlflow.db"]  # four slashes: SQLAlchemy's absolute path
    c = typed("recipe", compose("recipe", over))
    assert c.data.output_dir == "s3://b/run/data/chat_sample" and c.label.output_dir == "s3://b/run/label/sentiment"
    assert c.train.output_dir == "gs://g/t/" and c.evaluate.checkpoints["trained"] == "gs://g/t/tiny-cpu/hf"
    assert c.evaluate.checkpoints["web"] == "http://h//v1" and c.train.tracker.uri == "sqlite:////abs/mlflow.db"
    assert c.export.output_dir == "s3://b/run/export/tiny-cpu"
    stage = check("data", compose("data", ["paths.output_dir=s3://b/run/"]))
    assert stage.data.output_dir == "s3://b/run/data/chat_sample"


@pytest.mark.parametrize(
    "job, override, says",
    [
        ("train", "train.lrr=1", "Could not override 'train.lrr'"),  # a misspelled key
        ("data", "data.seq_len=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
        ("train", "train=nosuch", "Could not find 'train/nosuch'"),  # an option that is not there
    ],
)
def test_a_config_hydra_cannot_compose_exits_2_as_every_config_error(job, override, says):
    """Hydra's own errors (before our checks see the config) keep Hydra's message and exit 2, not
    Hydra's 1: a scheduler that retries on 1 does not retry a config that cannot work."""
    import subprocess
    import sys

    from cerbero_ray.config import REPO_DIR

    r = subprocess.run(
        [sys.executable, os.path.join(REPO_DIR, "jobs", f"{job}.py"), override],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and says in r.stderr, (r.returncode, r.stderr[-2000:])


def test_a_failure_after_the_config_is_composed_keeps_hydra_s_status(monkeypatch):
    """Only a config Hydra could not compose is turned into 2: once launch has it, Hydra's 1 (a
    library's failure) stays 1."""
    from cerbero_ray import runtime

    def hydra_exits(code, launched):
        def main():
            if launched:
                monkeypatch.setitem(runtime.LAUNCHED, "data", True)
            raise SystemExit(code)

        return main

    monkeypatch.setattr(runtime, "LAUNCHED", {})
    for code, launched, out in ((1, False, 2), (1, True, 1), (0, False, 0), (2, False, 2)):
        monkeypatch.setattr(runtime, "LAUNCHED", {})
        with pytest.raises(SystemExit) as e:
            runtime.hydra_job(hydra_exits(code, launched))
        assert e.value.code == out, (code, launched)
