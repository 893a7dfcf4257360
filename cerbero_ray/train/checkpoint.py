"""What a checkpoint holds, and how the loop writes and reads it.

    <checkpoint>/
      ds/state/…            DeepSpeed: weights (rank 0) + each rank's ZeRO optimizer partition;
                            the schedule and the loop's state (step, epoch, metrics) ride in its
                            client state
      torch/state/…         instead, under train.strategy=torch: the same, in torch.save files
                            (:mod:`cerbero_ray.train.native`)
      rng/rank_<r>.pt       each rank's torch / numpy / python RNG states
      hf/                   safetensors + config + tokenizer with the chat template (rank 0):
                            ``AutoModelForCausalLM.from_pretrained(<checkpoint>/hf)``
      adapter/              instead of hf/ under ``train.method=lora`` (the weights in ds/ then
                            leave the frozen base out: it is rebuilt, not stored)
      loop.json             rank 0: the step and the data order's signature (what the driver
                            reads to refuse a changed data order before any worker starts)
      complete/rank_<r>     written by each rank once all its files are in storage

Every rank writes its own files into its own folder, then copies them into the run folder's
``checkpoint_step_<step>/`` and marks its part complete. Resume takes the newest checkpoint whose
every rank is marked: a worker that dies while writing leaves an incomplete one, never a torn
resume, and the choice does not depend on Ray's controller having seen the report in time. A
resume from a bucket downloads what its node's ranks read (:func:`resume_files`): not ``hf/`` or
``adapter/``, nor the optimizer partitions and RNG states of the ranks on other nodes.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable

import numpy as np
import pyarrow.fs as pafs
import torch

from cerbero_ray import storage
from cerbero_ray.cards import write_card

TAG = "state"
PREFIX = "checkpoint_step_"
RECORD = "loop.json"


def checkpoint_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def publish(local_dir: str, run_dir: str, step: int, rank: int) -> str:
    """Copy this rank's files into ``<run_dir>/checkpoint_step_<step>`` (unless already there) and
    mark its part complete; returns the checkpoint's path or URI."""
    dest = storage.join(run_dir, checkpoint_name(step))
    if storage.resolve(local_dir)[1] != storage.resolve(dest)[1] or storage.is_uri(dest):
        storage.upload_folder(local_dir, dest, markers=False)  # the rank marks say it is complete
    storage.write_bytes(storage.join(dest, "complete", f"rank_{rank}"), b"")
    return dest


# a file of one rank's: its ZeRO optimizer partition (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``),
# its torch-strategy optimizer state, its RNG states
_RANK_FILE = re.compile(
    r"(?:zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt|/optimizer_rank_(\d+)\.pt|^rng/rank_(\d+)\.pt)$"
)


def resume_files(ranks: set[int]) -> Callable[[str], bool]:
    """Which files of a checkpoint (paths inside it) a resume on ``ranks`` (one node's) reads: the
    engine state and record, not the final model's ``hf/`` or ``adapter/`` (the engine state holds
    the weights: for a 7B, 14.5 GB not downloaded), nor the optimizer partitions and RNG states of
    other nodes' ranks (on 2 nodes, half the 87 GB of a 7B's optimizer state)."""

    def wanted(name: str) -> bool:
        if name.split("/", 1)[0] in ("hf", "adapter"):
            return False
        m = _RANK_FILE.search(name)
        return m is None or int(next(g for g in m.groups() if g is not None)) in ranks

    return wanted


def complete_checkpoints(run_dir: str, world_size: int) -> list[str]:
    """The run's checkpoints that every one of ``world_size`` ranks marked complete, oldest first."""
    fs, p = storage.resolve(run_dir)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    out = []
    for info in sorted(fs.get_file_info(pafs.FileSelector(p)), key=lambda i: i.base_name):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith(PREFIX):
            continue
        marks = fs.get_file_info(pafs.FileSelector(f"{info.path}/complete", allow_not_found=True))
        if {m.base_name for m in marks} >= {f"rank_{r}" for r in range(world_size)}:
            out.append(storage.join(run_dir, info.base_name))
    return out


def write_record(directory: str, step: int, signature: str, settings: dict | None = None) -> None:
    """Rank 0: the checkpoint's step, data-order signature and the settings that shaped its
    weights (:func:`~cerbero_ray.train.plan.settings`), readable without DeepSpeed or torch."""
    with open(os.path.join(directory, RECORD), "w") as f:
        json.dump({"step": step, "signature": signature, "settings": settings or {}}, f)


def read_record(checkpoint: str) -> dict | None:
    """What :func:`write_record` wrote in ``checkpoint`` (a path or URI); None for a checkpoint
    from before it was written (its workers check the signature in DeepSpeed's client state)."""
    try:
        return storage.read_json(storage.join(checkpoint, RECORD))
    except FileNotFoundError:
        return None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, directory: str, rank: int, client_state: dict, write_model=None, frozen: bool = False) -> None:
    """Write this rank's part of a checkpoint into ``directory`` (a collective: every rank calls it);
    ``write_model(folder)`` (rank 0) writes the model folder beside; ``frozen``: leave frozen
    parameters (a LoRA run's base) out of the weights."""
    engine.save_checkpoint(
        os.path.join(directory, _state_dir(engine)),
        tag=TAG,
        client_state=client_state,
        exclude_frozen_parameters=frozen,
    )
    os.makedirs(os.path.join(directory, "rng"), exist_ok=True)
    torch.save(rng_state(), os.path.join(directory, "rng", f"rank_{rank}.pt"))
    if rank == 0 and write_model is not None:
        write_model(directory)


def save_hf(hf_model, tokenizer, directory: str, dtype: torch.dtype | None = None, card: str | None = None) -> None:
    """An HF folder, its complete marker last (:func:`cerbero_ray.storage.check_folder`). ``dtype``:
    the floating weights written in it (fp32 masters as the bf16 model DeepSpeed's bf16 run
    exports), copied tensor by tensor to host memory; the model itself is left as it is. ``card``:
    its ``README.md`` (:mod:`cerbero_ray.train.card`)."""
    import json

    hf_model.config.use_cache = True
    state = None
    if dtype is not None:
        state = {
            k: v.detach().to("cpu", dtype) if v.is_floating_point() else v for k, v in hf_model.state_dict().items()
        }
    hf_model.save_pretrained(directory, safe_serialization=True, state_dict=state)
    hf_model.config.use_cache = False
    if dtype is not None:  # the config says what the model's (fp32) parameters are: say what was written
        path = os.path.join(directory, "config.json")
        cfg = json.load(open(path))
        cfg["dtype"] = str(dtype).split(".")[1]
        with open(path, "w") as f:
            json.dump(cfg, f, indent=2, sort_keys=True)
    if tokenizer is not None:
        from cerbero_ray.tokenizer import save_tokenizer

        save_tokenizer(tokenizer, directory)
    write_card(directory, card)
    storage.mark_complete(directory)


def save_hf_to(hf_model, tokenizer, dest: str) -> str:
    """:func:`save_hf` into a local folder or an object-store URI (staged locally, then uploaded)."""
    import shutil
    import tempfile

    if not storage.is_uri(dest):  # a complete folder or none: written beside it, then renamed
        final = storage.resolve(dest)[1]
        os.makedirs(os.path.dirname(final), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".hf-", dir=os.path.dirname(final))
        save_hf(hf_model, tokenizer, tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(hf_model, tokenizer, tmp)
        storage.upload_folder(tmp, dest)  # marked: a copy cut short reads as incomplete, not as a model
    return dest


def _state_dir(engine) -> str:
    """Where an engine's state goes in a checkpoint: ``ds`` (DeepSpeed) or ``torch``."""
    return getattr(engine, "state_dir", "ds")


def load(engine, directory: str, rank: int, frozen: bool = False) -> dict:
    """Restore weights, optimizer, schedule and RNG from ``directory``; returns the loop's state.
    ``frozen``: the checkpoint left the frozen parameters out (they are the rebuilt base's)."""
    sub = _state_dir(engine)
    names = {"ds": "deepspeed", "torch": "torch"}  # the state folder of each train.strategy
    if not os.path.isdir(os.path.join(directory, sub, TAG)):
        written = [s for s in names if s != sub and os.path.isdir(os.path.join(directory, s))]
        why = f": it was written with train.strategy={names[written[0]]}" if written else ""
        raise RuntimeError(f"no {names[sub]} state in {directory}/{sub}{why}")
    path, client = engine.load_checkpoint(
        os.path.join(directory, sub),
        tag=TAG,
        load_module_strict=not frozen,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise RuntimeError(f"no {names[sub]} state in {directory}/{sub}")
    rng = os.path.join(directory, "rng", f"rank_{rank}.pt")
    if os.path.exists(rng):
        set_rng_state(torch.load(rng, weights_only=False))
    return client
