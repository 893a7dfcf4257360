"""The GPU scripts cannot rot between lent GPUs (slow tier, run before each stop): every wheel
``bench/gpu_prepare.sh --train`` carries installs on the GPU image's Python (3.12, x86-64), it carries
nothing the image already has and needs nothing that is neither carried nor in the image, and
``CPU_SMOKE=1 bash bench/gpu_run.sh`` runs every stage's step to a zero exit on CPU (tiny sizes; the
../shared baselines are CUDA-only and skipped)."""

import json
import os
import re
import subprocess
import sys

import pytest

from cerbero_ray.config import REPO_DIR
from conftest import SHARED_DATA

pytestmark = pytest.mark.slow
# python 3.12 on x86-64 Linux, as the image's markers evaluate
IMAGE_PYTHON = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux"}
IMAGE_PYTHON |= {"platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython"}


def image_packages() -> set[str]:
    """The image's packages (bench/gpu_image_packages.txt, from the device tool's list), canonical names."""
    from packaging.utils import canonicalize_name

    lines = open(os.path.join(REPO_DIR, "bench", "gpu_image_packages.txt")).read().splitlines()
    return {canonicalize_name(n) for n in lines if n.strip() and not n.startswith("#")}


def wheel_requirements(wheel: str) -> tuple[str, dict[str, list]]:
    """A wheel's canonical name and its requirements by extra ("" for the unconditional ones)."""
    import email
    import zipfile

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename

    name = canonicalize_name(parse_wheel_filename(os.path.basename(wheel))[0])
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        msg = email.message_from_bytes(z.read(meta))
    reqs = [Requirement(r) for r in msg.get_all("Requires-Dist") or []]
    extras = {""} | set(msg.get_all("Provides-Extra") or [])
    on = {e: [r for r in reqs if not r.marker or r.marker.evaluate({**IMAGE_PYTHON, "extra": e})] for e in extras}
    return name, on


def unmet_requirements(wheels: list[str], image: set[str]) -> list[str]:
    """What a carried wheel needs (its extras followed through carried wheels) that neither the other
    carried wheels nor the image hold."""
    from packaging.utils import canonicalize_name

    by_name = dict(wheel_requirements(w) for w in wheels)
    have = set(by_name) | image
    missing, todo, seen = [], [(n, "") for n in by_name], set()
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen or name not in by_name:
            continue
        seen.add((name, extra))
        for r in by_name[name].get(extra, []):
            dep = canonicalize_name(r.name)
            if dep not in have:
                missing.append(f"{name}{f'[{extra}]' if extra else ''} needs {r}")
            todo += [(dep, e) for e in ("", *r.extras)]
    return missing


def test_every_carried_wheel_installs_for_python_3_12(tmp_path):
    d = tmp_path / "gpu"
    env = {**os.environ, "GPU_DIR": str(d), "CERBERO_SHARED": os.path.dirname(SHARED_DATA)}
    cmd = ["bash", "bench/gpu_prepare.sh", "--train"]
    r = subprocess.run(cmd, cwd=REPO_DIR, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    wheels = sorted(str(p) for p in (d / "whl").glob("*.whl"))
    names = {re.split(r"-\d", os.path.basename(w))[0].lower() for w in wheels}
    assert {"deepspeed", "mistral_common", "hydra_core", "pydantic_core", "liger_kernel"} <= names, names
    image = image_packages()
    assert {"torch", "transformers", "peft", "triton", "tiktoken", "attrs"} <= image  # the list is read whole
    carried = {wheel_requirements(w)[0] for w in wheels}
    assert not carried & image, carried & image  # nothing the image has: PYTHONPATH would shadow its copy
    # what importing them needs is there: transformers 5.17's AutoTokenizer imports mistral-common, whose
    # jsonschema and pydantic-extra-types were missing until 2026-12-05
    assert unmet_requirements(wheels, image) == []
    without = [w for w in wheels if not os.path.basename(w).startswith("jsonschema-")]
    assert unmet_requirements(without, image) == ["mistral-common needs jsonschema>=4.21.1"]
    r = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64"]
        + [
            "--platform",
            "manylinux2014_x86_64",
            "--platform",
            "manylinux_2_31_x86_64",
            "--target",
            str(tmp_path / "site"),
            *wheels,
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(re.findall(r"\S+-\S+", r.stdout.split("Would install", 1)[-1])) == len(wheels), r.stdout


def test_every_gpu_run_stage_runs_on_cpu(tmp_path):
    stages = [
        "serve",
        "probe",
        "structured",
        "label",
        "train",
        "accum",
        "lora",
        "lora_dropout",
        "compile",
        "native",
        "kernels",
        "train_attention",
        "whole7b",
        "whole7b_lora",
        "whole7b_offload",
        "attention",
        "prefill",
        "prefix",
        "selfchat",
        "prefix_store",
        "multilora",
        "evaluate",
    ]
    env = {**os.environ, "CPU_SMOKE": "1", "OUT": str(tmp_path), "CERBERO_DATA_DIR": SHARED_DATA}
    r = subprocess.run(
        ["bash", "bench/gpu_run.sh", *stages], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=1800
    )
    summary = r.stdout.split("--- summary", 1)[-1]
    ran = re.findall(r"^(\S+) rc=(\d+)", summary, re.M)
    assert ran and all(rc == "0" for _, rc in ran), summary + r.stdout[-3000:]
    assert {n for n, _ in ran} >= {"bench_serve_gpu", "bench_label_gpu", "bench_train_gpu", "bench_multilora"}
    assert {n for n, _ in ran} >= {
        "probe_decode_gpu",
        "bench_structured",
        "bench_train_gpu_compile",
        "bench_train_gpu_torch",
        "bench_train_gpu_liger",
        "bench_serve_gpu_flex",
        "bench_prefill",
        "bench_prefix",
        "bench_selfchat",
        "bench_prefix_store",
        "bench_train_gpu_lora_dropout",
    }


@pytest.mark.parametrize("stage", ["serve30", "train31"])
def test_a_one_call_stage_brings_every_figure_back(tmp_path, stage):
    """The stages sized for one device call: every step runs, the device tool's 8 files hold all they
    write, and each variant's comparison is against the default run of the same call."""
    env = {**os.environ, "CPU_SMOKE": "1", "OUT": str(tmp_path), "CERBERO_DATA_DIR": SHARED_DATA}
    r = subprocess.run(
        ["bash", "bench/gpu_run.sh", stage], cwd=REPO_DIR, env=env, capture_output=True, text=True, timeout=900
    )
    ran = re.findall(r"^(\S+) rc=(\d+)", r.stdout.split("--- summary", 1)[-1], re.M)
    assert len(ran) >= 3 and all(rc == "0" for _, rc in ran), r.stdout[-3000:]
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    load = lambda name: json.load(open(tmp_path / name))
    if stage == "train31":
        assert len(ran) == 6, ran
        for name, key in (
            ("torch", "vs_deepspeed_tokens_per_s"),
            ("lora", "vs_full_tokens_per_s"),
            ("liger", "vs_plain_kernels_tokens_per_s"),
            ("sdpa", "vs_auto_attention_tokens_per_s"),
            ("compile-layers", "vs_eager_tokens_per_s"),
        ):
            assert load(f"bench_train_gpu-{name}.json")[key] > 0, name
    else:
        flex = load("bench_serve_gpu-flex.json")["mixed_lengths_flex"]
        assert flex["all_short_vs_floor"] > 0 and flex["all_short_vs_hf"] > 0, flex
        low = load("bench_serve_gpu-flex.json")["low_occupancy"]
        assert low["vs_one_graph"] > 0 and low["same_text"] == "2/2", low
        assert {"bench_multilora.json"} <= set(files) and any(f.startswith("prefill") for f in files), files


def test_the_offloaded_optimizer_trains_like_the_plain_one(tmp_path):
    """``bench_train_gpu.py --offload`` (DeepSpeed's offload_optimizer to the host, torch's AdamW
    stepping the host's partitions): the same losses as without it, on CPU's tiny sizes."""
    losses = {}
    for extra in ([], ["--offload"]):
        out = tmp_path / ("offload" if extra else "plain")
        cmd = [sys.executable, "bench/bench_train_gpu.py", "--cpu-smoke", "--out", str(out), *extra]
        r = subprocess.run(cmd, cwd=REPO_DIR, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        (res,) = [json.load(open(p)) for p in out.glob("*.json")]
        assert res["args"]["offload"] == bool(extra)
        losses[bool(extra)] = res["final_loss"]
    assert losses[True] == losses[False] and losses[True] > 0, losses
