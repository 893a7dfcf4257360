"""Config-time checks of the training stage: each bad value is a ValueError naming its key, raised
on the driver before any worker starts."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cerbero_ray.config import check, compose, to_container
from cerbero_ray.tokenizer import build_tokenizer, tokenizer_hash
from cerbero_ray.train.run_plan import plan_run
from cerbero_ray.train.zero import deepspeed_config


def manifest_dir(tmp_path, seq_len=512, rows=40, tok_hash=None):
    d = tmp_path / "data"
    (d / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": [[0, 1]] * rows}), d / "shards" / "a.parquet")  # the rows it lists
    m = {
        "seq_len": seq_len,
        "tokenizer_hash": tok_hash or tokenizer_hash(build_tokenizer()),
        "shards": [{"path": str(d / "shards" / "a.parquet"), "rows": rows, "tokens": 1}],
    }
    (d / "manifest.json").write_text(json.dumps(m))
    return str(d)


def cfg(tmp_path, *overrides, **manifest):
    data = manifest_dir(tmp_path, **manifest)
    return to_container(compose("train", [f"paths.output_dir={tmp_path}", f"train.data_dir={data}", *overrides]))


def test_a_good_config_gets_its_run_plan(tmp_path):
    run = plan_run(cfg(tmp_path))
    assert run.seq_len == 512 and run.rows == 40 and run.run_dir == str(tmp_path / "train" / "tiny-cpu")
    with pytest.raises(AttributeError):  # frozen: what every worker trains on cannot drift
        run.rows = 1


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.global_batch_size=3", "train.global_batch_size"),  # not a multiple of micro × workers
        ("train.micro_batch_size=0", "train.micro_batch_size"),
        ("train.precision=fp16", "train.precision"),
        ("train.attention=flash", "train.attention"),
        ("train.schedule=step", "train.schedule"),
        ("deepspeed.stage=3", "deepspeed.stage"),
        ("train.seq_len=1024", "train.seq_len"),  # the shards are 512
        ("train.eval_rows=38", "train.eval_rows"),  # 4 + 38 > 40 rows
        ("+model.overrides.vocab_size=1000", "vocab_size"),  # smaller than the tokenizer
        ("+model.overrides.max_position_embeddings=256", "max_position_embeddings"),
        ("train.max_steps=0", "train.max_steps"),
        ("train.placement_strategy=SCATTER", "train.placement_strategy"),
        ("train.mix_block_rows=-1", "train.mix_block_rows"),
        ("train.strategy=fsdp", "train.strategy"),
        ("train.kernels=unsloth", "train.kernels"),
        ("train.name=", "train.name must be a folder name"),  # the run would be train.output_dir itself
        ("train.name=..", "train.name must be a folder name"),  # ... or the folder above it
        ("train.name=runs/a", "train.name must be a folder name"),
        ("train.read_cpus=0", "train.read_cpus must be at least 0.0001"),
        ("train.seed=-1", "train.seed must be >= 0"),  # numpy's generators refuse it, after Ray started
    ],
)
def test_bad_values_name_the_key(tmp_path, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        plan_run(cfg(tmp_path, override))


def test_flash_attention_needs_one_row_per_micro_batch(tmp_path):
    # transformers reads packed documents from position_ids on the flash path only for one row
    with pytest.raises(ValueError, match=r"train\.micro_batch_size=1"):
        plan_run(cfg(tmp_path, "train.attention=flash_attention_2", "train.micro_batch_size=2"))


def test_shards_from_another_tokenizer(tmp_path):
    with pytest.raises(ValueError, match="tokenizer"):
        plan_run(cfg(tmp_path, tok_hash="0123456789abcdef"))


def test_missing_data(tmp_path):
    c = to_container(compose("train", [f"paths.output_dir={tmp_path}", f"train.data_dir={tmp_path}/nothing"]))
    with pytest.raises(ValueError, match="train.data_dir"):
        plan_run(c)


def test_deepspeed_json():
    c = to_container(
        compose(
            "train",
            [
                "paths.output_dir=/tmp",
                "train.global_batch_size=8",
                "+deepspeed.extra.zero_optimization.round_robin_gradients=true",
            ],
        )
    )
    c = check("train", c)
    ds = deepspeed_config(c.deepspeed, c.train, world_size=2)
    assert ds["gradient_accumulation_steps"] == 4 and ds["train_batch_size"] == 8
    assert ds["zero_optimization"]["stage"] == 1 and ds["zero_optimization"]["round_robin_gradients"] is True
    assert ds["bf16"]["enabled"] is False  # tiny_cpu trains in fp32


def test_relative_output_folders_become_absolute(monkeypatch, tmp_path):
    """``paths.output_dir=outputs/x`` (relative): Ray Train's storage and the manifest's shard paths
    are absolute, so neither depends on the folder a worker or a later job runs in."""
    from cerbero_ray.data.manifest import _absolute
    from cerbero_ray.train.trainer import _storage

    monkeypatch.chdir(tmp_path)
    assert _storage("outputs/train") == {"storage_path": str(tmp_path / "outputs" / "train")}
    assert _absolute("outputs/d/shards/s.parquet") == str(tmp_path / "outputs" / "d" / "shards" / "s.parquet")
    assert _absolute("s3://b/d/s.parquet") == "s3://b/d/s.parquet"


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
@pytest.mark.parametrize("warmup", [0, 3])
def test_each_schedule_gives_transformers_learning_rates_and_resumes(tmp_path, schedule, warmup):
    """Our ``LambdaLR`` (no transformers scheduler import: it pulls peft and bitsandbytes into every
    worker) steps through transformers' own ``get_scheduler`` rates, bit for bit, and a scheduler
    rebuilt from a state dict mid-run goes on where the first one was."""
    import torch
    from transformers import get_scheduler

    from cerbero_ray.train.zero import build_scheduler

    t = check(
        "train", cfg(tmp_path, f"train.schedule={schedule}", f"train.warmup_steps={warmup}", "train.min_lr_ratio=0.2")
    ).train
    names = {"cosine": "cosine_with_min_lr", "linear": "linear", "constant": "constant_with_warmup"}

    def opt():
        return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=t.lr)

    ours, o2 = build_scheduler(o1 := opt(), t, 12), opt()
    kw = {"min_lr_rate": 0.2} if schedule == "cosine" else None
    theirs = get_scheduler(
        names[schedule], o2, num_warmup_steps=warmup, num_training_steps=12, scheduler_specific_kwargs=kw
    )
    got, want = [], []
    for step in range(14):  # two past the end: linear stays at 0, cosine at its floor
        got.append(o1.param_groups[0]["lr"])
        want.append(o2.param_groups[0]["lr"])
        if step == 6:
            again = build_scheduler(o3 := opt(), t, 12)
            again.load_state_dict(ours.state_dict())
            o3.param_groups[0]["lr"] = again.get_last_lr()[0]
            ours, o1 = again, o3
        o1.step(), ours.step(), o2.step(), theirs.step()
    assert got == want
    assert got[12] == pytest.approx({"cosine": 0.2, "linear": 0.0, "constant": 1.0}[schedule] * t.lr)
    if warmup:
        assert got[0] == 0.0 and got[1] == pytest.approx(t.lr / 3)


def test_a_changed_data_order_is_refused_before_any_worker_starts(tmp_path):
    """The newest checkpoint's record (step, data-order signature) against the run's: the driver
    refuses a resume in another order (Ray Train would restart the worker group train.max_failures
    times, each finding the same), also from a run of fewer workers (none of its checkpoints is
    whole for more); the same order (a checkpoint rank 1 did not finish included) and a finished
    run pass."""
    from cerbero_ray.train.checkpoint import checkpoint_name, write_record
    from cerbero_ray.train.plan import plan_all, signature, total_steps
    from cerbero_ray.train.run_plan import check_resume

    def plan(*over):
        c = check("train", cfg(tmp_path, *over))
        run = plan_run(c)
        return run, c, total_steps(plan_all(list(run.shards), c.train, c.train.num_workers), c.train)

    run, c, total = plan()
    t = c.train
    check_resume(run, c, total)  # no checkpoint yet

    def checkpoint(step, sig, ranks=(0, 1)):
        d = os.path.join(run.run_dir, checkpoint_name(step))
        os.makedirs(os.path.join(d, "complete"), exist_ok=True)
        write_record(d, step, sig)
        for r in ranks:
            open(os.path.join(d, "complete", f"rank_{r}"), "w").close()

    checkpoint(2, signature(list(run.shards), t, t.num_workers))
    check_resume(run, c, total)  # the same order resumes
    moved, c2, total2 = plan("train.global_batch_size=8")
    assert moved.run_dir == run.run_dir and total2 < total
    with pytest.raises(ValueError, match=r"another data order .* use a new train\.name \(.*checkpoint_step_0000002\)"):
        check_resume(moved, c2, total2)
    checkpoint(3, sig := signature(list(run.shards), t, t.num_workers), ranks=(0,))  # rank 1 died writing it
    check_resume(run, c, total)  # the same order: the workers resume from step 2
    one = check("train", cfg(tmp_path, "train.num_workers=1", "train.global_batch_size=2"))
    checkpoint(4, signature(list(run.shards), one.train, 1), ranks=(0,))  # a one-worker run's, whole for it
    assert sig != signature(list(run.shards), one.train, 1)
    with pytest.raises(ValueError, match="checkpoint_step_0000004"):  # newer than any whole for two workers
        check_resume(run, c, total)
    assert total2 > 4
    checkpoint(total2, "another")  # a finished run reads nothing more, whatever its order
    check_resume(moved, c2, total2)


def test_a_resume_under_other_settings_is_refused_naming_each(tmp_path):
    """A checkpoint resumes with its own weights, optimizer and schedule: a rerun under another
    learning rate, schedule or model (finished or not) would silently not apply them, so the driver
    refuses it naming each key and both values, and so do the workers (torchrun has no driver
    check); what only changes how the run executes (kernels, checkpointing, logging) resumes."""
    from cerbero_ray.train.checkpoint import checkpoint_name, write_record
    from cerbero_ray.train.plan import plan_all, settings, settings_changed, signature, total_steps
    from cerbero_ray.train.run_plan import check_resume

    c = check("train", cfg(tmp_path))
    run = plan_run(c)
    total = total_steps(plan_all(list(run.shards), c.train, c.train.num_workers), c.train)
    d = os.path.join(run.run_dir, checkpoint_name(total))  # a finished run
    os.makedirs(os.path.join(d, "complete"))
    write_record(d, total, signature(list(run.shards), c.train, c.train.num_workers), settings(c))
    for r in (0, 1):
        open(os.path.join(d, "complete", f"rank_{r}"), "w").close()
    check_resume(run, c, total)
    for over in ("train.checkpoint_every=1", "train.log_every=5", "train.attention=eager", "train.keep_checkpoints=3"):
        check_resume(run, check("train", cfg(tmp_path, over)), total)
    other = check("train", cfg(tmp_path, "train.lr=0.0123", "train.schedule=linear"))
    with pytest.raises(ValueError) as e:
        check_resume(run, other, total)
    assert str(e.value).startswith(f"{run.run_dir} holds a run trained with other settings (")
    assert f"train.lr: {c.train.lr!r} -> 0.0123; train.schedule: 'cosine' -> 'linear'" in str(e.value)
    assert str(e.value).endswith("use a new train.name, or delete the run folder to start over")
    lora = check("train", cfg(tmp_path, "train.method=lora"))
    with pytest.raises(ValueError, match=r"train\.method: 'full' -> 'lora'"):
        check_resume(run, lora, total)
    with pytest.raises(ValueError, match=r"model\.overrides: .*hidden_size"):
        check_resume(run, check("train", cfg(tmp_path, "+model.overrides.hidden_size=96")), total)
    assert settings_changed(None, settings(other), "x") is None  # a checkpoint from before the record
    assert settings_changed({"train.lr": 2e-05, "train.new_key": 1}, {"train.lr": 2e-05}, "x") is None


def test_a_worker_s_verdict_on_its_input_makes_the_restarts_fail_at_once(tmp_path):
    """Ray Train restarts a failed worker group train.max_failures times: a check of ours that
    failed in a worker is left in the run folder, so each restart raises it before building its
    model; a library's error (a crash, perhaps transient) is not, and the driver reads the verdict
    once, leaving the folder clean for a rerun."""
    from cerbero_ray.train.trainer import FAILED, attempt, verdict

    run_dir = str(tmp_path / "run")
    calls = []

    def ours():
        calls.append("ours")
        plan_run(cfg(tmp_path, "train.seq_len=1024"))  # raises from our code: the shards are 512

    with pytest.raises(ValueError, match=r"train\.seq_len=1024 but the shards"):
        attempt(run_dir, ours)
    assert os.path.exists(os.path.join(run_dir, FAILED))
    with pytest.raises(ValueError, match=r"train\.seq_len=1024 but the shards"):
        attempt(run_dir, ours)  # the restart: at once
    assert calls == ["ours"]
    assert verdict(run_dir).startswith("train.seq_len=1024 but the shards") and verdict(run_dir) is None

    def library():
        calls.append("library")
        json.loads("{not json")

    with pytest.raises(ValueError, match="Expecting property name"):
        attempt(run_dir, library)
    with pytest.raises(ValueError, match="Expecting property name"):
        attempt(run_dir, library)  # tried again: not a verdict on the input
    assert calls == ["ours", "library", "library"] and verdict(run_dir) is None
    attempt(run_dir, lambda: calls.append("fine"))
    assert calls[-1] == "fine" and not os.path.exists(os.path.join(run_dir, FAILED))


def test_a_data_folder_copied_elsewhere_trains_from_its_own_shards(tmp_path):
    """The manifest lists each shard by the full path the data stage wrote; a copy of the folder
    (another disk, another machine, through a link) reads the shards beside its manifest, never
    the folder it was copied from (gone here: before, "…/a.parquet is missing")."""
    import shutil

    c = cfg(tmp_path)
    here = plan_run(c).shards
    os.symlink(tmp_path / "data", tmp_path / "link")  # the same folder by another name: the listed path kept
    c["train"]["data_dir"] = str(tmp_path / "link")  # (what a run's data order is signed with stays)
    assert plan_run(c).shards == here
    copy = tmp_path / "elsewhere" / "data"
    shutil.copytree(tmp_path / "data", copy)
    shutil.rmtree(tmp_path / "data")
    c["train"]["data_dir"] = str(copy)
    moved = plan_run(c)
    assert moved.rows == 40 and moved.shards[0]["path"] == str(copy / "shards" / "a.parquet") != here[0]["path"]


def test_a_run_resumes_from_a_copy_of_its_data_folder_but_not_from_other_data(tmp_path):
    """A checkpoint signs its data order by what the shards hold, not where they lie: a run started on
    the local data folder resumes once the folder is copied to another place (a bucket for the
    cluster); before, the copy's paths signed it as "another data order". Data made again with other
    sources or settings is refused even at the same paths (the paths alone let it through), and a
    checkpoint signed by the paths, as runs from before were, still resumes where they are."""
    import shutil

    from cerbero_ray.config import check
    from cerbero_ray.train.checkpoint import checkpoint_name, write_record
    from cerbero_ray.train.plan import plan_all, signature, total_steps
    from cerbero_ray.train.run_plan import check_resume

    c = check("train", cfg(tmp_path))
    t = c.train
    run = plan_run(c)
    total = total_steps(plan_all(list(run.shards), t, t.num_workers), t)
    d = os.path.join(run.run_dir, checkpoint_name(2))
    os.makedirs(os.path.join(d, "complete"))
    write_record(d, 2, signature(list(run.shards), t, t.num_workers, run.data_id))
    for r in (0, 1):
        open(os.path.join(d, "complete", f"rank_{r}"), "w").close()
    copy = tmp_path / "bucket-copy" / "data"
    shutil.copytree(tmp_path / "data", copy)
    on_copy = check("train", cfg(tmp_path, f"train.data_dir={copy}"))
    there = plan_run(on_copy)
    assert there.shards[0]["path"] != run.shards[0]["path"] and there.data_id == run.data_id
    check_resume(there, on_copy, total)  # the copy resumes the run
    m = json.loads((copy / "manifest.json").read_text())
    for change in ({"config_hash": "another"}, {"shards": [{**m["shards"][0], "tokens": 2}]}):
        (copy / "manifest.json").write_text(json.dumps({**m, **change}))  # data made again: other settings
        with pytest.raises(ValueError, match="another data order"):
            check_resume(plan_run(on_copy), on_copy, total)
    write_record(d, 2, signature(list(run.shards), t, t.num_workers))  # signed by its paths: from before
    check_resume(run, c, total)


def test_shards_missing_or_rewritten_since_the_manifest_are_refused_on_the_driver(tmp_path):
    """Each listed shard's Parquet footer against the manifest's rows: a folder copied in part or a
    shard rewritten fails in one line naming the file, before any worker reads it mid-epoch."""
    c = cfg(tmp_path)
    shard = tmp_path / "data" / "shards" / "a.parquet"
    pq.write_table(pa.table({"input_ids": [[0, 1]] * 20}), shard)
    with pytest.raises(ValueError, match=r"train\.data_dir: .*a\.parquet has 20 rows; the manifest says 40 rows"):
        plan_run(c)
    shard.unlink()
    with pytest.raises(ValueError, match=r"train\.data_dir: .*a\.parquet is missing; the manifest says 40 rows"):
        plan_run(c)


def test_a_ray_record_that_ray_train_would_refuse_is_set_aside_not_deleted(tmp_path):
    """Ray Train refuses to start on its record of a run's checkpoints when the record is cut short
    or from another Ray version (as when a checkpoint it names is gone: tests/test_train.py, on a
    record the real Ray Train wrote); the driver moves it aside, keeping its bytes, and the workers
    resume from the run folder. No record, or a good one, is left alone."""
    import ray

    from cerbero_ray.train.trainer import RAY_RECORD, set_aside_ray_record

    run = tmp_path / "run"
    assert set_aside_ray_record(str(run)) is None  # a new run
    os.makedirs(run / "checkpoint_step_0000003")
    good = {"ray_version": ray.__version__, "checkpoint_results": [{"checkpoint_dir_name": "checkpoint_step_0000003"}]}
    (run / RAY_RECORD).write_text(json.dumps(good))
    assert set_aside_ray_record(str(run)) is None and json.loads((run / RAY_RECORD).read_text()) == good
    other = json.dumps({**good, "ray_version": "2.9.0"})
    for body, why in ((json.dumps(good)[:40], "it is not JSON"), (other, "Ray 2.9.0 wrote it")):
        (run / RAY_RECORD).write_text(body)
        said = set_aside_ray_record(str(run))
        assert said.startswith(f"Ray Train's record of this run's checkpoints set aside ({why}")
        aside = said.rsplit(": ", 1)[1]
        assert not (run / RAY_RECORD).exists() and open(aside).read() == body
        os.rename(aside, tmp_path / "seen")  # the next case's moved file may take the same second's name


@pytest.mark.parametrize("method", ["full", "lora", "lora-merged"])
def test_a_finished_run_is_known_on_the_driver_only_when_everything_it_wrote_is_there(tmp_path, method):
    """``trainer.finished``: a rerun starts no worker only for a run whose summary says every step
    was trained, whose checkpoint of that step every rank completed, and whose model folders are
    there (``hf/``; under LoRA ``adapter/``, and ``hf/`` when merged). Anything less: None (the
    workers resume, or train on)."""
    from cerbero_ray.train.checkpoint import checkpoint_name, write_record
    from cerbero_ray.train.trainer import finished

    lora = ["train.method=lora", f"train.lora.merge={method == 'lora-merged'}"] if method != "full" else []
    t = check("train", cfg(tmp_path, *lora)).train
    run = tmp_path / "run"
    ckpt = run / checkpoint_name(8)
    (ckpt / "complete").mkdir(parents=True)
    write_record(str(ckpt), 8, "sig")
    models = {"hf": "config.json"} if method != "lora" else {}
    models |= {"adapter": "adapter_config.json"} if method != "full" else {}
    summary = {"steps": 8, "method": t.method, "hf_dir": str(run / "hf") if "hf" in models else None}
    summary |= {"adapter_dir": str(run / "adapter")} if method != "full" else {}
    (run / "summary.json").write_text(json.dumps(summary))
    for rank in range(t.num_workers - 1):
        (ckpt / "complete" / f"rank_{rank}").touch()
    assert finished(str(run), t, 8) is None  # one rank never completed the checkpoint
    (ckpt / "complete" / f"rank_{t.num_workers - 1}").touch()
    for folder, marker in models.items():
        assert finished(str(run), t, 8) is None, folder  # that model folder is not there yet
        (run / folder).mkdir()
        (run / folder / marker).touch()
    assert finished(str(run), t, 8) == {**summary, "checkpoint": str(ckpt)}
    assert finished(str(run), t, 12) is None  # more steps asked: the workers train on
    other = check("train", cfg(tmp_path, *(["train.method=lora"] if method == "full" else []))).train
    assert finished(str(run), other, 8) is None  # the other method's run
    write_record(str(ckpt), 6, "sig")
    assert finished(str(run), t, 8) is None  # its newest complete checkpoint is of an earlier step
