"""The README's main-job command, as a user runs it (once for the module): the data stage, training
with the held-out loss falling, the HF folder loading with ``from_pretrained``, labeling with it, the
untrained and the trained model evaluated (EVALITA absent: skipped with one line), the GGUF files;
then a stage run again picks up its finished work."""

import json
import os
import re
import subprocess
import sys

import pytest

from cerbero_ray.config import REPO_DIR
from cerbero_ray.export import quantize
from conftest import SHARED_DATA

pytestmark = pytest.mark.integration


def main_job(env: dict, cwd, *overrides: str) -> subprocess.CompletedProcess:
    """``python jobs/recipe.py [overrides]`` as the README runs it; asserts it exits 0."""
    r = subprocess.run(
        [sys.executable, os.path.join(REPO_DIR, "jobs", "recipe.py"), *overrides],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


# the README's command with two overrides that cut its time (1 epoch, 24 SQuAD-it rows); the
# README's figures come from the command as written
FASTER = ("train.epochs=1", "evaluate.tasks.squad_it.max_rows=24")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """The main job, once for the module's tests: (its output folder, what it printed, its env).
    Ray's default token auth on embedded clusters is what every in-process test (ray_local) runs
    under; here it is off, as the README's "RAY_AUTH_MODE=disabled" users run it. No EVALITA data:
    the main job says so in one line and evaluates the shipped SQuAD-it slice."""
    out = tmp_path_factory.mktemp("recipe")
    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "CERBERO_OUTPUT_DIR": str(out),
        "CERBERO_DATA_DIR": str(out / "no-shared-data"),
    }
    return out, main_job(env, out, *FASTER).stdout, env


def test_data_and_training(run):
    out, said, _ = run
    manifest = out / "data" / "chat_sample" / "manifest.json"
    assert f"manifest: {manifest}" in said
    m = json.load(open(manifest))
    assert m["documents"] == 107 and m["seq_len"] == 512 and m["rejected"] == 0
    held = re.search(r"held-out loss: ([\d.]+) -> ([\d.]+)", said)
    assert held and float(held[2]) < float(held[1]) - 1.0, said[-3000:]
    hf = out / "train" / "tiny-cpu" / "hf"
    assert f"from_pretrained('{hf}'): MistralForCausalLM" in said
    assert (out / "train" / "tiny-cpu" / "loss.png").stat().st_size > 10_000
    # its model card (tests/test_card.py: its code runs), written before the folder's complete marker
    from huggingface_hub import ModelCard

    card, ran = ModelCard.load(str(hf / "README.md")), json.load(open(out / "train" / "tiny-cpu" / "summary.json"))
    assert card.data.language == ["it"] and card.data.library_name == "transformers" and card.data.license is None
    assert f"| steps | {ran['steps']} × 4 rows ({ran['steps'] * 4:,} rows = " in card.text  # train=tiny_cpu's batch
    assert f"| {ran['eval_losses'][0]:.4f} | {ran['eval_losses'][-1]:.4f} |" in card.text
    assert "| deduplication | `exact`: 0 exact duplicate(s) of 107 documents dropped |" in card.text  # the manifest's
    assert "README.md" in json.load(open(hf / ".cerbero-complete"))["files"]
    # the checkpoint at the last step has its card too, the run's (tests/test_train.py: one before the end)
    last = sorted((out / "train" / "tiny-cpu").glob("checkpoint_step_*"))[-1]
    assert int(last.name.rsplit("_", 1)[1]) == ran["steps"]
    assert f"| steps | {ran['steps']} × 4 rows" in ModelCard.load(str(last / "hf" / "README.md")).text
    took = re.search(r"\[recipe\] 5 stage\(s\) in (.+?): (.+)", said)  # last: each stage's wall time
    assert took and [p.split()[0] for p in took[2].split(", ")] == ["data", "train", "label", "export", "evaluate"]


def test_labels_exports_and_evaluation(run):
    out, said, _ = run
    assert re.search(r"\[label\] 107 rows -> .*label/sentiment/parts", said)
    assert re.search(r"\[label\] distribution: positive [\d,]+ \([\d.]+%\), negative", said)
    # evaluation: the untrained and the trained model (and its Q4_K_M file), figures with intervals:
    # on the console a headline (at most 40 lines from the evaluation's first line on), in results.md
    # every table
    interval = r"[\d.]+ \[[\d.]+, [\d.]+\]"
    assert re.search(rf"\| untrained \| {interval} \|", said), said[-3000:]
    evaluation = said[said.index("[evaluate]") :].splitlines()
    assert len(evaluation) <= 40, "\n".join(evaluation)
    assert f"every table (protocols, wordings, baselines, published rows): {out}/evaluate/results.md" in said
    assert "[evaluate] skipped, their files are not there" in said and "ami2020, ironita, sentipolc" in said
    md = (out / "evaluate" / "results.md").read_text()
    assert re.search(rf"\| untrained \| generate \| {interval} \|", md)
    assert re.search(rf"\| trained \| benchita \(v2, first gold\) \| {interval} \|", md)
    assert "| mistral-7b (published) | published |" in md and "trained - untrained" in md
    # the trained model's run records what its data was checked against (nothing, here): results.md says so
    assert "## Training data and these test sets" in md and "| trained | not checked |" in md
    assert "| untrained |" not in md.split("## Training data and these test sets")[1].split("##")[0]
    results = json.load(open(out / "evaluate" / "results.json"))
    models = {"untrained", "trained"} | ({"trained-Q4_K_M"} if quantize.available() else set())
    if quantize.available():  # the GGUF file's folder card carries the checkpoint card's record
        assert "| trained-Q4_K_M | not checked |" in md
    assert set(results["results"]) == models and results["tasks"]["squad_it"]["rows"] == 24
    assert set(results["results"]["trained"]["squad_it"]) == {"generate/0", "generate/1", "benchita/0"}
    assert (out / "evaluate" / "results.png").stat().st_size > 1000
    gguf = out / "export" / "tiny-cpu"
    assert (gguf / "cerbero-F16.gguf").stat().st_size > 1_000_000 and 'Llama(model_path="' in said
    if quantize.available():
        assert (gguf / "cerbero-Q4_K_M.gguf").stat().st_size > 1_000_000


def test_a_resume_on_one_machine_downloads_only_what_its_ranks_read(run):
    """Of the job's checkpoint (two ZeRO-1 ranks, as DeepSpeed names their files), a resume of rank
    1 alone on a machine reads its own optimizer partition and RNG states, the weights and the
    record: not rank 0's partition, not the HF folder (the final model's)."""
    from cerbero_ray.train.checkpoint import resume_files

    out, _, _ = run
    ckpt = sorted((out / "train" / "tiny-cpu").glob("checkpoint_step_*"))[-1]
    names = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file()}
    kept = {n for n in names if resume_files({1})(n)}
    dropped = names - kept
    assert {"loop.json", "ds/state/mp_rank_00_model_states.pt", "rng/rank_1.pt"} <= kept
    assert any(n.endswith("zero_pp_rank_1_mp_rank_00_optim_states.pt") for n in kept)
    zero0 = {n for n in names if n.endswith("zero_pp_rank_0_mp_rank_00_optim_states.pt")}
    assert zero0 and {n for n in dropped if not n.startswith("hf/")} == zero0 | {"rng/rank_0.pt"}
    assert {n for n in names if n.startswith("hf/")} <= dropped and "hf/model.safetensors" in names
    assert {n for n in names if resume_files({0, 1})(n)} == {n for n in names if not n.startswith("hf/")}


def test_a_rerun_picks_up_finished_work(run):
    """The same command again resumes instead of starting over: checked here on the stages no other
    test reruns (data: the same config's shards are up to date; train: a finished run starts no
    worker and loads no checkpoint; export: the files are kept); a killed training, labeling and
    evaluation resume in their own tests (test_train, test_label, test_evaluate_pipeline), and on a
    bucket in test_s3."""
    out, _, env = run
    manifest = out / "data" / "chat_sample" / "manifest.json"
    summary = out / "train" / "tiny-cpu" / "summary.json"
    before = json.load(open(manifest)), json.load(open(summary))
    again = main_job(env, out, *FASTER, "stages=[data,train,export]")
    said = again.stdout + again.stderr
    assert "is up to date" in said and "cerbero-F16.gguf was made from this checkpoint as it is now: kept" in said
    steps = before[1]["steps"]
    assert f"tiny-cpu finished its {steps} steps: nothing to train" in said, said[-3000:]
    assert "RayTrainWorker" not in said and "resumed from step" not in said  # no worker started
    assert re.search(rf"checkpoint: .*/train/tiny-cpu/checkpoint_step_0*{steps}\n", said), said[-3000:]
    assert (json.load(open(manifest)), json.load(open(summary))) == before


@pytest.mark.slow  # ~5 minutes
def test_the_main_job_as_the_readme_writes_it(tmp_path):
    """The README's command with nothing cut (4 epochs, the whole SQuAD-it slice) and the EVALITA
    files ../shared/data holds where it is there: three more tasks whose few-shot prompts are longer
    than 512 tokens, scored by transformers and, for the Q4_K_M file, by one llama.cpp session over
    many batches (a batch longer than the first overflowed the model it kept: only this run met
    it). Every model gets a figure for every task."""
    readme = open(os.path.join(REPO_DIR, "README.md"), encoding="utf-8").read()
    assert "-e '.[gguf]' && python jobs/recipe.py\n```" in readme  # the command this test runs
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "CERBERO_OUTPUT_DIR": str(tmp_path)}
    said = main_job(env, tmp_path).stdout
    evalita = os.path.isdir(os.path.join(SHARED_DATA, "evalita"))  # CERBERO_DATA_DIR, as conftest reads it
    tasks = ["squad_it", *(["ami2020", "ironita", "sentipolc"] if evalita else [])]
    results = json.load(open(tmp_path / "evaluate" / "results.json"))["results"]
    assert set(results) == {"untrained", "trained", "trained-Q4_K_M"}, said[-3000:]
    for model, per_task in results.items():
        assert set(tasks) <= set(per_task), (model, sorted(per_task))
    row = re.search(r"^\| trained-Q4_K_M \|(.+)\|$", said, re.M)
    assert row and len(row[1].split("|")) == len(tasks) and all(re.search(r"\d", c) for c in row[1].split("|"))
    assert re.search(r"\[recipe\] 5 stage\(s\) in ", said)


@pytest.mark.slow  # ~3 minutes; each part is also tested alone (test_lora, test_train, test_export, test_serve)
def test_main_job_lora_then_served_beside_another_adapter(tmp_path):
    """One override, as a new user would: ``python jobs/recipe.py train.method=lora`` trains an
    adapter that is labeled, exported (merged, and as a llama.cpp LoRA with its base) and evaluated;
    then ``jobs/serve.py`` serves it beside a second adapter of the same base, from one endpoint."""
    import signal
    import urllib.request

    from test_serve_sigterm import _post, _start

    from conftest import make_adapter

    env = {
        **os.environ,
        "RAY_AUTH_MODE": "disabled",
        "CERBERO_OUTPUT_DIR": str(tmp_path),
        "CERBERO_DATA_DIR": str(tmp_path / "no-shared-data"),
    }
    r = main_job(env, tmp_path, "train.method=lora", "train.epochs=2")
    run = tmp_path / "train" / "tiny-cpu"
    adapter, base = run / "adapter", run / "base"
    assert f"from_pretrained('{adapter}'): PeftModel.from_pretrained: MistralForCausalLM + LoRA" in r.stdout
    assert re.search(r"adapter +.*\(LoRA: [\d,]+ trainable parameters, [\d.]+% of", r.stdout)
    held = re.search(r"held-out loss: ([\d.]+) -> ([\d.]+)", r.stdout)
    assert held and float(held[2]) < float(held[1]), r.stdout[-3000:]
    assert not (run / "hf").exists()  # train.lora.merge=false: the adapter is the output
    assert re.search(r"\[label\] 107 rows -> .*label/sentiment/parts", r.stdout)
    gguf = tmp_path / "export" / "tiny-cpu"
    names = {"cerbero-F16.gguf", "cerbero-LORA-F32.gguf", "cerbero-base-F16.gguf"}
    assert names <= set(os.listdir(gguf)) and "lora_path=" in r.stdout
    assert "base-f16 + lora: llama.cpp check ok" in r.stdout
    results = json.load(open(tmp_path / "evaluate" / "results.json"))
    assert {"untrained", "trained"} <= set(results["results"])
    assert results["results"]["trained"]["squad_it"]  # the adapter, merged on its recorded base

    other = make_adapter(str(base), str(tmp_path / "other"), 4, ["q_proj", "v_proj"], 3)
    proc, url = _start(str(base), tmp_path, f"+serve.adapters.trained={adapter}", f"+serve.adapters.other={other}")
    try:
        with urllib.request.urlopen(f"{url}/v1/models", timeout=30) as resp:
            assert [m["id"] for m in json.loads(resp.read())["data"]] == ["cerbero", "trained", "other"]
        texts = {}
        for name in ("cerbero", "trained", "other"):
            body = {
                "model": name,
                "messages": [{"role": "user", "content": "Ciao!"}],
                "max_tokens": 8,
                "temperature": 0,
            }
            st, out = _post(f"{url}/v1/chat/completions", body)
            assert st == 200 and out["model"] == name
            texts[name] = out["choices"][0]["message"]["content"]
        st, out = _post(f"{url}/v1/label", {"task": "sentiment", "texts": ["Bellissimo!"], "model": "trained"})
        assert st == 200 and out["results"][0]["label"] in ("positive", "negative", "neutral")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
    assert len(set(texts.values())) > 1, texts  # the adapters answer differently from the base
