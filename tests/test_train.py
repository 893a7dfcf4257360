"""The training stage on the embedded Ray cluster: 2 CPU workers, DeepSpeed ZeRO-1 over gloo, fp32.

A worker killed mid-run (after a checkpoint, before the next) resumes from the checkpoint with the
exact data position, schedule and RNG: every step sees the same rows and has the same loss as in an
uninterrupted run, and the final weights are bit-identical; the HF folder loads with
``from_pretrained``."""

import json
import os

import pytest
import torch
from safetensors.torch import load_file

from cerbero_ray.config import compose, to_container
from cerbero_ray.data.pipeline import run_data
from cerbero_ray.train import run_train
from conftest import SAMPLES, data_stage

pytestmark = pytest.mark.integration
STEPS = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("data") / "chat"
    run_data(
        data_stage(
            out,
            {
                "chat": {
                    "path": os.path.join(SAMPLES, "chat_it_openassistant.jsonl"),
                    "format": "openai",
                    "weight": 1.0,
                    "text_field": "text",
                }
            },
            seq_len=256,
        )
    )
    return str(out)


def train_overrides(shards, out, name, extra=(), **train) -> list[str]:
    return [
        *extra,
        f"paths.output_dir={out}",
        f"train.data_dir={shards}",
        f"train.name={name}",
        f"train.max_steps={STEPS}",
        "train.checkpoint_every=3",
        "train.eval_every=4",
        "train.log_every=2",
        "train.epochs=1",
        "train.keep_checkpoints=2",
    ] + [f"train.{k}={v}" for k, v in train.items()]


def train_cfg(shards, out, name, extra=(), **train):
    return to_container(compose("train", train_overrides(shards, out, name, extra, **train)))


def history(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def run_torchrun(overrides: list[str]) -> dict:
    """The run of ``overrides`` without Ray: ``cerbero_ray.train.local`` under torchrun, one process
    per ``train.num_workers`` (what a GPU box without Ray runs); its summary."""
    import subprocess
    import sys

    from conftest import free_port

    t = compose("train", overrides).train
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={t.num_workers}"]
    cmd += [f"--master-port={free_port()}", "-m", "cerbero_ray.train.local", *overrides]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.load(open(os.path.join(t.output_dir, t.name, "summary.json")))


def test_killed_worker_resumes_exactly(shards, tmp_path, ray_local, monkeypatch):
    """The uninterrupted reference runs without Ray (torchrun, 2 gloo ranks: ~14 s here against ~33 s
    on Ray Train), so the killed Ray Train run also shows that both paths train bit for bit alike.
    The clean run logs into W&B (offline), the killed one into MLflow (a file store): each tracker
    run holds every step once, with metrics.jsonl's values (tests/test_tracking.py: the rest)."""
    wandb = ["train.tracker.kind=wandb", "train.tracker.project=killed"]
    clean = run_torchrun(train_overrides(shards, tmp_path, "clean", wandb))  # as many ranks as the killed run
    assert clean["steps"] == STEPS and clean["resumed_from"] is None
    mlflow = ["train.tracker.kind=mlflow", f"train.tracker.uri=file:{tmp_path}/mlruns", "train.tracker.project=killed"]
    killed = run_train(train_cfg(shards, tmp_path, "killed", mlflow, fail_at_step=4, fail_rank=1))
    run = killed["run_dir"]
    assert open(os.path.join(run, ".fault_injected")).read() == "4"  # it did die
    assert killed["resumed_from"] == 3  # and came back from the step-3 checkpoint
    a, b = history(clean["run_dir"]), history(run)
    assert [h["step"] for h in b if "loss" in h] == list(range(1, STEPS + 1))  # each step once in the record
    # same rows at every step (a skipped or repeated row would change the loss and token count)
    for x, y in zip([h for h in a if "loss" in h], [h for h in b if "loss" in h]):
        assert (x["loss"], x["loss_tokens"], x["lr"]) == (y["loss"], y["loss_tokens"], y["lr"])
    wa = load_file(os.path.join(clean["hf_dir"], "model.safetensors"))
    wb = load_file(os.path.join(killed["hf_dir"], "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert clean["eval_losses"] == killed["eval_losses"] and clean["eval_losses"][-1] < clean["eval_losses"][0]
    tracked(tmp_path, clean, killed)
    # the last K checkpoints only, each with an HF folder
    ckpts = sorted(d for d in os.listdir(run) if d.startswith("checkpoint_step_"))
    assert ckpts == ["checkpoint_step_0000006", "checkpoint_step_0000008"]
    assert os.path.exists(os.path.join(run, ckpts[-1], "hf", "model.safetensors"))
    # each HF folder with its model card: the one before the end says it is a checkpoint, with the run so far
    early, last = (open(os.path.join(run, c, "hf", "README.md")).read() for c in ckpts)
    assert "**A checkpoint at step 6 of 8**" in early and "| steps | 6 × " in early
    assert "**A checkpoint" not in last and "| steps | 8 × " in last
    # each with the record the driver reads to refuse another data order (tests/test_train_config.py)
    from cerbero_ray.train.checkpoint import read_record

    records = [read_record(os.path.join(run, c)) for c in ckpts]
    assert [r["step"] for r in records] == [6, 8] and len({r["signature"] for r in records}) == 1
    from cerbero_ray.config import check
    from cerbero_ray.train.run_plan import check_resume, plan_run

    # the driver signs the order as the workers did: the same config would resume (were the run
    # longer), another seed is refused before any worker starts
    same = check("train", train_cfg(shards, tmp_path, "killed", fail_at_step=4, fail_rank=1))
    check_resume(plan_run(same), same, STEPS + 1)
    other = check("train", train_cfg(shards, tmp_path, "killed", seed=7))
    with pytest.raises(ValueError, match="another data order"):
        check_resume(plan_run(other), other, STEPS + 1)
    # so are the settings that shaped the weights (a finished run too), also under torchrun, where
    # each process says it before building its model
    from cerbero_ray.train.local import run_local
    from cerbero_ray.train.plan import settings

    assert records[-1]["settings"] == settings(same)
    monkeypatch.setenv("WORLD_SIZE", "2")
    changed = rf"clean holds a run trained with other settings \(train\.lr: {same.train.lr!r} -> 0\.0123\)"
    with pytest.raises(ValueError, match=changed):
        run_local([*train_overrides(shards, tmp_path, "clean"), "train.lr=0.0123"])
    assert os.path.exists(os.path.join(run, "loss.png")) and os.listdir(os.path.join(run, "tensorboard"))
    # Ray Train's own record of the run (written by this Ray): kept while it names what is there; set
    # aside once a checkpoint it names is gone, since Ray Train would refuse to start on it (the
    # workers resume from the run folder; a rerun on a set-aside record: tests/test_s3.py)
    import shutil

    from cerbero_ray.train.trainer import RAY_RECORD, set_aside_ray_record

    assert set_aside_ray_record(run) is None and os.path.isfile(os.path.join(run, RAY_RECORD))
    back = tmp_path / "went-back-one"  # the run folder with its newest checkpoint deleted by hand
    os.makedirs(back / "checkpoint_step_0000006")
    shutil.copy(os.path.join(run, RAY_RECORD), back)
    why = set_aside_ray_record(str(back))
    assert why and "it names checkpoint_step_0000008, which is gone" in why
    left = sorted(os.listdir(back))
    assert len(left) == 2 and left[0].startswith(f"{RAY_RECORD}.set-aside-") and left[1] == "checkpoint_step_0000006"

    # a rerun of a finished run returns its summary and starts no worker (tests/test_recipe.py's
    # rerun, tests/test_s3.py); one stopped after its last checkpoint, before its summary, resumes
    # at its end (tests/test_s3.py, from a bucket)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(clean["hf_dir"])
    tok = AutoTokenizer.from_pretrained(clean["hf_dir"])
    assert torch.equal(model.state_dict()["lm_head.weight"], wa["lm_head.weight"])
    assert "[|AI|]" in tok.apply_chat_template(
        [{"role": "user", "content": "Ciao"}], tokenize=False, add_generation_prompt=True
    )


def tracked(tmp_path, clean: dict, killed: dict) -> None:
    """The killed run's MLflow run and the clean run's W&B run: every step once, the run's values,
    its summary's figures and files."""
    from mlflow.tracking import MlflowClient

    from conftest import wandb_history, wandb_summary

    losses = [(h["step"], h["loss"]) for h in history(killed["run_dir"]) if "loss" in h]
    evals = [0, 4, STEPS]  # train.eval_every=4, and the last step's
    rec = json.load(open(os.path.join(killed["run_dir"], "tracker.json")))
    client = MlflowClient(tracking_uri=f"file:{tmp_path}/mlruns")
    runs = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert [r.info.run_id for r in runs] == [rec["run_id"]]  # one run, though two worker groups logged into it
    run = client.get_run(rec["run_id"])
    assert run.info.status == "FINISHED" and run.data.params["train.checkpoint_every"] == "3"
    assert sorted((m.step, m.value) for m in client.get_metric_history(rec["run_id"], "train/loss")) == losses
    held = sorted((m.step, m.value) for m in client.get_metric_history(rec["run_id"], "eval/loss"))
    assert held == list(zip(evals, killed["eval_losses"]))
    # the run's summary: its figures at the last step, and as a file beside the loss curve
    for key in ("final_loss", "tokens_per_s_median", "train_s", "trainable_params"):
        (m,) = client.get_metric_history(rec["run_id"], f"summary/{key}")
        assert (m.step, m.value) == (STEPS, killed[key]), key
    assert sorted(a.path for a in client.list_artifacts(rec["run_id"])) == ["loss.png", "summary.json"]
    got = json.load(open(client.download_artifacts(rec["run_id"], "summary.json", str(tmp_path))))
    assert got == {k: v for k, v in killed.items() if k != "checkpoint"}  # the driver adds the checkpoint
    run_id, rows = wandb_history(clean["run_dir"])  # W&B's folder, inside the (local) run folder
    assert run_id == json.load(open(os.path.join(clean["run_dir"], "tracker.json")))["run_id"]
    assert [(r["_step"], r["train/loss"]) for r in rows if "train/loss" in r] == losses
    assert [(r["_step"], r["eval/loss"]) for r in rows if "eval/loss" in r] == list(zip(evals, clean["eval_losses"]))
    summary = wandb_summary(clean["run_dir"])
    assert summary["summary/final_loss"] == clean["final_loss"] and summary["summary/train_s"] == clean["train_s"]
    import glob

    files = glob.glob(os.path.join(clean["run_dir"], "wandb", "offline-run-*", "files", "*"))
    assert {"loss.png", "summary.json"} <= {os.path.basename(f) for f in files}


def test_bf16_on_cpu_without_ray(shards, tmp_path):
    """The Ray-free entry point (what a GPU box without Ray runs), DeepSpeed bf16 with fp32 masters
    (``train.strategy=torch``'s export in bf16: tests/test_train_native.py)."""
    import subprocess
    import sys

    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "cerbero_ray.train.local",
            f"paths.output_dir={tmp_path}",
            f"train.data_dir={shards}",
            "train.precision=bf16",
            "train.max_steps=3",
            "train.epochs=1",
            "train.num_workers=1",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.load(open(tmp_path / "train" / "tiny-cpu" / "summary.json"))
    assert summary["steps"] == 3 and summary["eval_losses"][-1] < summary["eval_losses"][0]
    hf = tmp_path / "train" / "tiny-cpu" / "hf"
    w = load_file(str(hf / "model.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in w.values())
    assert json.load(open(hf / "config.json"))["dtype"] == "bfloat16"
    assert os.path.isdir(tmp_path / "train" / "tiny-cpu" / "checkpoint_step_0000003" / "ds" / "state")


OOM_RUNS = """
import sys, torch
from cerbero_ray import storage
from cerbero_ray.train import loop
from cerbero_ray.train.local import run_local
from cerbero_ray.train.trainer import FAILED, attempt

real, calls = loop.train_step, []

def oom_at(n):  # the n-th step of this process runs out of memory, as a full card does
    def step(*a, **k):
        calls.append(1)
        if len(calls) == n:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(*a, **k)
    return step

out, over = sys.argv[1], sys.argv[2:]
loop.train_step = oom_at(1)
run = out + "/train/first"
try:  # as a Ray Train worker runs it: the verdict is left for the restarts
    attempt(run, lambda: run_local([*over, "train.name=first"]))
except ValueError as e:
    print("VERDICT", e)
print("LEFT", storage.read_json(storage.join(run, FAILED))["error"][:40])
try:
    attempt(run, lambda: print("BUILT AGAIN"))
except ValueError as e:
    print("AT ONCE", str(e)[:40])
calls.clear()
loop.train_step = oom_at(3)
try:  # two steps done in this attempt: a restart may pass, so it is not a verdict
    run_local([*over, "train.name=later"])
except torch.OutOfMemoryError:
    print("RAISED OOM")
"""


def test_out_of_memory_before_a_step_is_a_verdict_and_later_a_restart(shards, tmp_path):
    """A step that runs out of memory before the attempt finished any: one line naming the keys
    to change, left as the run's verdict (Ray Train's restarts fail at once instead of building the
    model again to run out the same way); after steps have passed, the error stays as it is."""
    import subprocess
    import sys

    over = [f"paths.output_dir={tmp_path}", f"train.data_dir={shards}", "train.strategy=torch"]
    over += ["train.max_steps=4", "train.epochs=1", "train.num_workers=1", "train.eval_rows=0"]
    r = subprocess.run(
        [sys.executable, "-c", OOM_RUNS, str(tmp_path), *over], capture_output=True, text=True, timeout=600
    )
    said = r.stdout
    assert r.returncode == 0, r.stderr[-3000:]
    verdict = next(line for line in said.splitlines() if line.startswith("VERDICT"))
    assert "train: out of memory in step 1, before this attempt finished a step (4 micro-batch(es) of" in verdict
    assert "train.micro_batch_size=1 row(s) x 256 tokens per rank and step): every restart would" in verdict
    assert "Lower train.micro_batch_size" in verdict and "train.gradient_checkpointing=true" in verdict
    assert "LEFT train: out of memory in step 1" in said and "AT ONCE train: out of memory" in said
    assert "BUILT AGAIN" not in said and "RAISED OOM" in said
    # a resumed run keeps its checkpoint's data order, micro-batch included: the line says so
    from cerbero_ray.config.train import TrainConfig
    from cerbero_ray.train.loop import out_of_memory

    fresh, resumed = (out_of_memory(TrainConfig(), 256, 4, torch.device("cpu"), "step 7", r) for r in (False, True))
    assert "needs another train.name" in resumed and "train.name" not in fresh


ENDINGS = """
import json, sys
from mlflow.tracking import MlflowClient
from cerbero_ray.train import env
from cerbero_ray.train.local import run_local

def status(run_dir):
    rec = json.load(open(run_dir + "/tracker.json"))
    run = MlflowClient(tracking_uri=rec["uri"]).get_run(rec["run_id"])
    return [run.info.status, run.data.tags.get("cerbero.failure")]

run_dir, ends = sys.argv[1], []
for at, how in ((4, "stop"), (7, "fail"), (None, None)):  # Ctrl-C or a signal; an error; to the end
    def after_step(self, step, at=at, how=how):
        if step == at and how == "stop":
            raise KeyboardInterrupt("SIGTERM")  # as runtime.interrupt_on_sigterm raises it
        if step == at:
            raise RuntimeError("the disk is full\\nits details")
    env.LocalEnv.after_step = after_step
    try:
        run_local(sys.argv[2:])
        ends.append(["FINISHED", None])
    except BaseException as e:
        ends.append([type(e).__name__, str(e)])
    ends.append(status(run_dir))
print("ENDS", json.dumps(ends))
"""


def test_a_tracker_run_says_how_each_attempt_ended(shards, tmp_path):
    """MLflow's status of a training run, attempt by attempt (one process, as torchrun's rank 0):
    KILLED by a signal, RUNNING again and FAILED with the error's first line, FINISHED at the end
    (the failure's tag gone);
    every step in it once, as metrics.jsonl has it. The driver's mark after a failure rank 0
    already marked leaves it be; the status of a run Ray Train restarts: test_killed_worker_resumes_exactly."""
    import subprocess
    import sys

    from conftest import free_port

    mlflow = ["train.tracker.kind=mlflow", f"train.tracker.uri=file:{tmp_path}/mlruns"]
    over = train_overrides(shards, tmp_path, "ends", mlflow, num_workers=1, eval_rows=0)
    run = str(tmp_path / "train" / "ends")
    r = subprocess.run(
        [sys.executable, "-c", ENDINGS, run, *over],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "MASTER_PORT": str(free_port())},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    ends = json.loads(next(line[5:] for line in r.stdout.splitlines() if line.startswith("ENDS ")))
    assert ends == [
        ["KeyboardInterrupt", "SIGTERM"],
        ["KILLED", "stopped by SIGTERM"],
        ["RuntimeError", "the disk is full\nits details"],
        ["FAILED", "RuntimeError: the disk is full"],  # the tag of this attempt: the first line
        ["FINISHED", None],
        ["FINISHED", None],  # a failure's tag goes when the run is resumed
    ], r.stderr[-3000:]
    from mlflow.tracking import MlflowClient

    from cerbero_ray.tracking import end_run

    rec = json.load(open(os.path.join(run, "tracker.json")))
    client = MlflowClient(tracking_uri=rec["uri"])
    end_run(rec, RuntimeError("a node was lost"), "train.tracker")  # the driver's, on a run not RUNNING: left be
    assert client.get_run(rec["run_id"]).info.status == "FINISHED"
    losses = [(h["step"], h["loss"]) for h in history(run) if "loss" in h]
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    assert sorted((m.step, m.value) for m in client.get_metric_history(rec["run_id"], "train/loss")) == losses


REFUSED_KEY = """
import sys
from cerbero_ray.train import loop
from cerbero_ray.train.local import run_local
from cerbero_ray.train.trainer import attempt

def built(*a, **k):
    print("MODEL BUILT")
    sys.exit(3)

loop.build_engine = built
try:  # as a Ray Train worker runs it
    attempt(sys.argv[1], lambda: run_local(sys.argv[2:]))
except ValueError as e:
    print("VERDICT", e)
"""


def test_a_tracker_that_refuses_its_key_is_one_line_before_the_model_is_built(shards, tmp_path):
    """W&B online without a key: the run's verdict in one line, from rank 0 before it builds its
    model (a 7B's load is minutes); Ray Train's restarts would raise it at once."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), WANDB_DIR=str(tmp_path), WANDB_SILENT="true")  # no key anywhere
    over = [f"paths.output_dir={tmp_path}", f"train.data_dir={shards}", "train.num_workers=1"]
    over += ["train.tracker.kind=wandb", "train.name=run"]
    run = str(tmp_path / "train" / "run")
    r = subprocess.run(
        [sys.executable, "-c", REFUSED_KEY, run, *over], capture_output=True, text=True, timeout=300, env=env
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MODEL BUILT" not in r.stdout
    verdict = next(line for line in r.stdout.splitlines() if line.startswith("VERDICT"))
    assert verdict.startswith("VERDICT train.tracker: wandb could not start: ") and "API key" in verdict
    assert json.load(open(os.path.join(run, "tracker.json")))["kind"] == "wandb"


@pytest.mark.slow  # ~1 minute
def test_a_check_that_fails_in_the_workers_is_one_line_and_no_verdict_is_left(shards, tmp_path, ray_local):
    """A checkpoint from before loop.json (the driver cannot read its data order) resumed in another
    order: the workers refuse it, their verdict makes Ray Train's restart fail at once
    (tests/test_train_config.py), and the driver raises it as one ValueError, leaving no verdict."""
    from cerbero_ray.train.trainer import FAILED

    run = run_train(train_cfg(shards, tmp_path, "old"))["run_dir"]  # checkpoints 6 and 8 kept
    os.remove(os.path.join(run, "checkpoint_step_0000008", "loop.json"))
    longer = [o for o in train_overrides(shards, tmp_path, "old") if not o.startswith("train.max_steps=")]
    longer += [f"train.max_steps={STEPS + 4}", "train.seed=7", "train.max_failures=1"]  # unfinished, reordered
    with pytest.raises(ValueError, match=r"^this run's checkpoint was made with another data order"):
        run_train(to_container(compose("train", longer)))
    assert not os.path.exists(os.path.join(run, FAILED))


@pytest.mark.slow  # ~1 minute
def test_the_torch_strategy_under_ray_train_resumes_exactly(shards, tmp_path, ray_local):
    """``train.strategy=torch`` on Ray Train's 2 gloo workers (DDP, ZeroRedundancyOptimizer): a worker
    killed mid-run resumes from its own checkpoint format to the same losses and bit-identical
    weights, and the HF folder loads."""
    from transformers import AutoModelForCausalLM

    clean = run_torchrun(train_overrides(shards, tmp_path, "native", strategy="torch"))  # without Ray, as above
    killed = run_train(train_cfg(shards, tmp_path, "native-killed", strategy="torch", fail_at_step=4, fail_rank=1))
    assert killed["resumed_from"] == 3 and clean["eval_losses"] == killed["eval_losses"]
    a, b = history(clean["run_dir"]), history(killed["run_dir"])
    assert [h["loss"] for h in a if "loss" in h] == [h["loss"] for h in b if "loss" in h]
    wa = load_file(os.path.join(clean["hf_dir"], "model.safetensors"))
    wb = load_file(os.path.join(killed["hf_dir"], "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ck = sorted(d for d in os.listdir(killed["run_dir"]) if d.startswith("checkpoint_step_"))[-1]
    state = os.path.join(killed["run_dir"], ck, "torch", "state")
    assert {"optimizer_rank_0.pt", "optimizer_rank_1.pt", "model.pt", "engine.pt"} <= set(os.listdir(state))
    assert AutoModelForCausalLM.from_pretrained(clean["hf_dir"]).dtype == torch.float32  # precision=fp32 here


@pytest.mark.slow  # ~1 minute
def test_lora_on_plain_data_parallel_resumes_exactly(shards, tmp_path, ray_local):
    """``deepspeed.stage=0`` (plain data parallel, what bench/bench_lora_zero.py measures against
    ZeRO-1 for a small trainable set): a killed worker gives the same adapter, bit for bit."""
    lora, dp = {"method": "lora", "lora.r": 4, "lora.dropout": 0.05}, ["deepspeed.stage=0"]  # dropout: RNG resumed
    clean = run_torchrun(train_overrides(shards, tmp_path, "dp", extra=dp, **lora))  # without Ray, as above
    killed = run_train(train_cfg(shards, tmp_path, "dp-killed", extra=dp, fail_at_step=4, fail_rank=1, **lora))
    assert killed["resumed_from"] == 3 and clean["eval_losses"] == killed["eval_losses"]
    a = load_file(os.path.join(clean["adapter_dir"], "adapter_model.safetensors"))
    b = load_file(os.path.join(killed["adapter_dir"], "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_lora_run_trains_only_the_adapter_and_records_its_base(shards, tmp_path):
    """train.method=lora, 2 ranks: the base stays frozen (and out of the checkpoints), the
    random-init base is written once and recorded in the adapter, the adapter loads with peft. It
    runs without Ray (torchrun: ~17 s against ~33 s on Ray Train), the loop Ray Train's workers run;
    LoRA under Ray Train, killed and resumed bit for bit, is the slow tier's (the resume itself is
    the full fine-tune's, tested above on Ray Train)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    clean = run_torchrun(train_overrides(shards, tmp_path, "lora", method="lora", **{"lora.r": 4}))
    assert clean["method"] == "lora" and clean["hf_dir"] is None and 0 < clean["trainable_share"] < 0.05
    a = load_file(os.path.join(clean["adapter_dir"], "adapter_model.safetensors"))
    assert all(v.dtype == torch.float32 and "lora_" in k for k, v in a.items())  # no base weights copied
    assert clean["eval_losses"][-1] < clean["eval_losses"][0]
    # the random-init base the adapter was trained on, written once, recorded in the adapter
    base_dir = os.path.join(clean["run_dir"], "base")
    rec = json.load(open(os.path.join(clean["adapter_dir"], "cerbero_base.json")))
    assert rec["base"] == base_dir == clean["base"] and rec["model_type"] == "mistral"
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    from cerbero_ray.models import tiny

    init = tiny(seed=0).state_dict()
    assert all(torch.equal(v, init[k]) for k, v in base.state_dict().items())  # frozen: the initial weights
    # checkpoints hold the adapter and its optimizer state, not the base
    ck = sorted(d for d in os.listdir(clean["run_dir"]) if d.startswith("checkpoint_step_"))[-1]
    states = os.path.join(clean["run_dir"], ck, "ds", "state")
    model_states = [f for f in os.listdir(states) if "model_states" in f]
    assert model_states and all(os.path.getsize(os.path.join(states, f)) < 1_000_000 for f in model_states)
    assert os.path.exists(os.path.join(clean["run_dir"], ck, "adapter", "adapter_model.safetensors"))
    pm = PeftModel.from_pretrained(base, clean["adapter_dir"])
    assert sum(p.numel() for n, p in pm.named_parameters() if "lora_" in n) == clean["trainable_params"]
    # its model card, in place of peft's template: the base to load it on (tests/test_card.py: the code runs)
    from huggingface_hub import ModelCard

    card = ModelCard.load(os.path.join(clean["adapter_dir"], "README.md"))
    assert card.data.library_name == "peft" and "lora" in card.data.tags
    assert f'base = "{base_dir}"' in card.text and "| method | LoRA r=4, alpha=32" in card.text


@pytest.mark.slow  # ~1 minute
def test_lora_killed_worker_resumes_exactly(shards, tmp_path, ray_local):
    """train.method=lora (ZeRO-1): a worker killed mid-run gives the same adapter, bit for bit."""
    lora = {"method": "lora", "lora.r": 4, "lora.dropout": 0.05}  # dropout draws: the RNG states must resume too
    clean = run_torchrun(train_overrides(shards, tmp_path, "lora", **lora))  # without Ray, as above
    killed = run_train(train_cfg(shards, tmp_path, "lora-killed", fail_at_step=4, fail_rank=1, **lora))
    assert killed["resumed_from"] == 3 and clean["eval_losses"] == killed["eval_losses"]
    a = load_file(os.path.join(clean["adapter_dir"], "adapter_model.safetensors"))
    b = load_file(os.path.join(killed["adapter_dir"], "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpu_workers_the_embedded_cluster_lacks_are_refused_before_ray_train_waits(shards, tmp_path, ray_local):
    """Every worker's GPU (or CPUs) together, checked against the embedded cluster before the
    trainer starts: what it lacks would never come (tests/test_label.py: a model actor, a replica)."""
    with pytest.raises(
        ValueError, match=r"train.use_gpu=true \(a GPU each\) needs 2 GPU; the embedded Ray cluster has 0 GPU"
    ):
        run_train(train_cfg(shards, tmp_path, "gpu", use_gpu="true"))
    with pytest.raises(ValueError, match=r"train.cpus_per_worker=3 needs 6 CPU; the embedded Ray cluster has 2 CPU"):
        run_train(train_cfg(shards, tmp_path, "cpus", cpus_per_worker=3))
    # a CUDA-only attention kernel on CPU workers: one error before Ray Train starts (torchrun without
    # Ray picks its device from CUDA itself, so the config check lets it through there)
    for kernel in ("flex_attention", "flash_attention_2"):
        with pytest.raises(
            ValueError,
            match=rf"train.attention={kernel} (is for|needs) CUDA.*use_gpu=false gives Ray Train's workers no GPU",
        ):
            run_train(train_cfg(shards, tmp_path, "attn", attention=kernel))
    assert not os.path.exists(os.path.join(tmp_path, "train", "attn"))  # nothing started
