"""The GPU scripts cannot rot between lent GPUs (slow tier, run before each stop): every wheel
``bench/gpu_prepare.sh --train`` carries installs on the GPU image's Python (3.12, x86-64), it carries
nothing the image already has, and ``CPU_SMOKE=1 bash bench/gpu_run.sh`` runs every stage's step to
a zero exit on CPU (tiny sizes; the ../shared baselines are CUDA-only and skipped)."""

import os
import re
import subprocess
import sys

import pytest

from cerbero_ray.config import REPO_DIR
from conftest import SHARED_DATA

pytestmark = pytest.mark.slow
IMAGE_HAS = {"torch", "transformers", "peft", "accelerate", "scikit_learn", "pyarrow", "safetensors", "numpy"}


def test_every_carried_wheel_installs_for_python_3_12(tmp_path):
    d = tmp_path / "gpu"
    env = {**os.environ, "GPU_DIR": str(d), "CERBERO_SHARED": os.path.dirname(SHARED_DATA)}
    cmd = ["bash", "bench/gpu_prepare.sh", "--train"]
    r = subprocess.run(cmd, cwd=REPO_DIR, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    wheels = sorted(str(p) for p in (d / "whl").glob("*.whl"))
    names = {re.split(r"-\d", os.path.basename(w))[0].lower() for w in wheels}
    assert {"deepspeed", "mistral_common", "hydra_core", "pydantic_core", "liger_kernel"} <= names, names
    assert not names & IMAGE_HAS, names
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
        "attention",
        "prefill",
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
        "bench_train_gpu_lora_dropout",
    }
