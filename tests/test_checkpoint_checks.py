"""A checkpoint whose weights are missing or cut short (an interrupted copy), or an output folder that
is a file, is one line naming the key, before Ray starts: never a safetensors or makedirs traceback
after the cluster is up."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from cerbero_ray.checkpoints import check_weights
from cerbero_ray.config import REPO_DIR, compose
from cerbero_ray.models import from_pretrained, tiny


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    tiny().save_pretrained(d)
    return str(d)


def _copy(good, tmp_path, name="ckpt"):
    d = tmp_path / name
    shutil.copytree(good, d)
    return d


def test_a_whole_checkpoint_passes(good):
    check_weights(good, "label.checkpoint")


def test_a_logit_bias_past_the_vocabulary_is_named(good):
    """The generate stage's check before Ray: the vocabulary config.json declares, the ids against it."""
    from cerbero_ray.checkpoints import vocab_size
    from cerbero_ray.config.sampling import check_token_ids

    vocab = vocab_size(good)
    assert vocab == 32000
    check_token_ids({0: 1.0, 31999: -100.0}, vocab, "generate.sampling.logit_bias")
    check_token_ids({}, vocab, "generate.sampling.logit_bias")
    with pytest.raises(ValueError, match=r"generate.sampling.logit_bias: token id\(s\) \[32000, 40000\] outside"):
        check_token_ids({40000: 1.0, 5: 1.0, 32000: 2.0}, vocab, "generate.sampling.logit_bias")


def test_cut_short_weights_are_named_with_their_size(good, tmp_path):
    d = _copy(good, tmp_path)
    f = d / "model.safetensors"
    size = f.stat().st_size
    os.truncate(f, size // 2)
    with pytest.raises(
        ValueError, match=rf"label.checkpoint: .*model.safetensors is cut short: {size // 2:,} of {size:,}"
    ):
        check_weights(str(d), "label.checkpoint")
    with pytest.raises(ValueError, match="cut short"):  # the loading path says the same (URIs get here)
        from_pretrained(str(d), dtype="float32")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(b"not a safetensors file at all"), "is not a safetensors file"),
        (lambda f: f.write_bytes(b""), "is not a safetensors file"),
        (lambda f: f.write_bytes((20).to_bytes(8, "little") + b"{broken json here!!}"), "corrupt header"),
        (lambda f: f.write_bytes(f.read_bytes() + b"\0" * 10), "10 bytes past its tensors"),
    ],
)
def test_corrupt_weights_are_named(good, tmp_path, damage, message):
    d = _copy(good, tmp_path)
    damage(d / "model.safetensors")
    with pytest.raises(ValueError, match=f"serve.checkpoint: .*{message}"):
        check_weights(str(d), "serve.checkpoint")


def test_missing_weights_and_missing_shards(good, tmp_path):
    d = _copy(good, tmp_path)
    os.remove(d / "model.safetensors")
    with pytest.raises(ValueError, match="has config.json but no weights"):
        check_weights(str(d), "export.checkpoint")
    index = {
        "metadata": {},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"},
    }
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    shutil.copy(os.path.join(good, "model.safetensors"), d / "model-00001-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 of the 2 shards its index names: \['model-00002-of-00002"):
        check_weights(str(d), "export.checkpoint")
    (d / "model.safetensors.index.json").write_text("[]")
    with pytest.raises(ValueError, match="is not a weight index"):
        check_weights(str(d), "export.checkpoint")


@pytest.mark.parametrize(
    "stage, overrides, key",
    [
        ("label", ["label.checkpoint={ckpt}"], "label.checkpoint"),
        ("generate", ["generate.checkpoint={ckpt}"], "generate.checkpoint"),
        ("serve", ["serve.checkpoint={ckpt}"], "serve.checkpoint"),
        ("export", ["export.checkpoint={ckpt}"], "export.checkpoint"),
        ("evaluate", ["evaluate.checkpoints.tiny-cpu={ckpt}"], "evaluate.checkpoints.tiny-cpu"),
        ("train", ["model=hf", "model.path={ckpt}"], "model.path"),
    ],
)
def test_every_stage_checks_weights_at_compose_time(good, tmp_path, stage, overrides, key):
    d = _copy(good, tmp_path)
    os.truncate(d / "model.safetensors", 1000)
    over = [o.format(ckpt=d) for o in overrides]
    with pytest.raises(ValueError, match=f"{key}: .*cut short"):
        compose(stage, over, checked=True)


@pytest.mark.parametrize(
    "stage, key",
    [
        ("data", "data.output_dir"),
        ("train", "train.output_dir"),
        ("label", "label.output_dir"),
        ("generate", "generate.output_dir"),
        ("evaluate", "evaluate.output_dir"),
        ("export", "export.output_dir"),
    ],
)
def test_an_output_folder_that_is_a_file_is_refused(good, tmp_path, stage, key):
    f = tmp_path / "a_file"
    f.write_text("x")
    over = [f"{key}={f}"]
    if stage in ("label", "generate", "export"):
        over.append(f"{stage}.checkpoint={good}")
    if stage == "evaluate":  # its default names the demo's checkpoint, absent on a fresh clone
        over.append(f"evaluate.checkpoints.tiny-cpu={good}")
    with pytest.raises(ValueError, match=f"{key}: {f} is a file"):
        compose(stage, over, checked=True)


def test_the_job_says_it_in_one_line_before_ray(good, tmp_path):
    d = _copy(good, tmp_path)
    os.truncate(d / "model.safetensors", 1000)
    r = subprocess.run(
        [sys.executable, os.path.join(REPO_DIR, "jobs", "export.py"), f"export.checkpoint={d}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: export.checkpoint: ") and "cut short" in r.stderr
    assert "Traceback" not in r.stderr and "Ray" not in r.stderr
