"""Where the training loop runs: under Ray Train, or in plain processes (torchrun, one process).

The loop in :mod:`cerbero_ray.train.loop` needs six things from its surroundings (:class:`TrainEnv`):
its rank and device, its micro-batches, the latest checkpoint, a place to write a checkpoint, a way
to publish metrics and checkpoints, and a hook after each step (where drills inject a fault).
:class:`RayEnv` takes them from Ray Train and Ray Data;
:class:`LocalEnv` from ``torch.distributed`` environment variables and the run folder itself, so
the same loop runs on a machine without Ray (GPU benchmarks).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from typing import Iterator, Protocol

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from cerbero_ray import storage
from cerbero_ray.train.checkpoint import PREFIX, checkpoint_name, complete_checkpoints, publish, resume_files
from cerbero_ray.train.plan import Segment
from cerbero_ray.train.reader import local_batches, ray_batches

log = logging.getLogger(__name__)

FAULT_MARKER = ".fault_injected"


class TrainEnv(Protocol):
    """What :func:`cerbero_ray.train.loop.train_loop` asks of where it runs."""

    rank: int
    world_size: int
    device: torch.device

    def batches(self, segments: list[Segment], micro: int, read_cpus: float) -> Iterator[dict]: ...
    def latest_checkpoint(self) -> str | None: ...
    def loaded(self) -> None: ...
    def checkpoint_dir(self, step: int) -> str: ...
    def report(self, metrics: dict, checkpoint: str | None = None) -> None: ...
    def after_step(self, step: int) -> None: ...


def _ranks_here(rank: int) -> set[int]:
    """The ranks on this machine (they share its disk and its cache): by host name, from every rank
    (a collective: every rank calls it)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {rank}
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, socket.gethostname())
    return {r for r, h in enumerate(hosts) if h == hosts[rank]}


class _RunFolder:
    """Resume from the run folder: the newest checkpoint every rank marked complete. Drills:
    ``fail_at_step`` makes rank ``fail_rank`` die abruptly after that step, once per run."""

    run_dir: str
    world_size: int
    rank: int
    fail_at_step: int | None = None
    fail_rank: int = 1

    _copied: str | None = None

    def latest_checkpoint(self) -> str | None:
        """A local folder holding it, or None. From a bucket, downloaded once per machine, and only
        what its ranks read (:func:`~cerbero_ray.train.checkpoint.resume_files`)."""
        ranks = _ranks_here(self.rank) if storage.is_uri(self.run_dir) else None  # every rank, or none
        done = complete_checkpoints(self.run_dir, self.world_size)
        if not done:
            return None
        if ranks is None:
            return storage.local_copy(done[-1])
        self._copied = done[-1]
        tag = hashlib.sha256(json.dumps(sorted(ranks)).encode()).hexdigest()[:8]
        return storage.local_copy(done[-1], only=resume_files(ranks), part=f"resume-{tag}")

    def loaded(self) -> None:
        """Every rank has loaded the checkpoint :meth:`latest_checkpoint` gave: its downloaded copy
        goes (a 7B's is ~100 GB, and each resume is another checkpoint's)."""
        if self._copied is None:
            return
        if dist.is_initialized():
            dist.barrier()  # the node's other ranks may still be reading it
        storage.drop_copy(self._copied)
        self._copied = None

    def after_step(self, step: int) -> None:
        if self.fail_at_step != step or self.rank != self.fail_rank:
            return
        fs, p = storage.resolve(storage.join(self.run_dir, FAULT_MARKER))
        if fs.get_file_info(p).is_file:
            return
        fs.create_dir(p.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(p) as f:
            f.write(str(step).encode())
        log.warning(f"[train] fault injection: rank {self.rank} exits after step {step}")
        os._exit(1)


class LocalEnv(_RunFolder):
    """A torchrun process, or a single process (world size 1), writing into ``run_dir`` itself."""

    def __init__(self, run_dir: str, keep: int = 2, fail_at_step: int | None = None, fail_rank: int = 1):
        self.fail_at_step, self.fail_rank = fail_at_step, fail_rank
        for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0")):
            os.environ.setdefault(k, v)  # one process without a launcher; DeepSpeed reads them too
        self.rank = int(os.environ["RANK"])
        self.world_size = int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ["LOCAL_RANK"])
        cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", "29517")
            dist.init_process_group("nccl" if cuda else "gloo", rank=self.rank, world_size=self.world_size)
        self.run_dir, self.keep = run_dir, keep

    def batches(self, segments: list[Segment], micro: int, read_cpus: float) -> Iterator[dict]:
        return local_batches(segments, micro)

    def close(self) -> None:
        """After a finished run: every rank leaves together, then the process group goes. A process
        that exits with its group alive, or while a peer is still in a collective, can abort in
        gloo's/NCCL's teardown ("terminate called without an active exception"), and torchrun
        then reports a finished run as failed."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    def checkpoint_dir(self, step: int) -> str:
        dest = storage.join(self.run_dir, checkpoint_name(step))
        if storage.is_uri(dest):
            return tempfile.mkdtemp(prefix=f"cerbero-ckpt-{self.rank}-")
        os.makedirs(dest, exist_ok=True)  # local: written in place
        return dest

    def report(self, metrics: dict, checkpoint: str | None = None) -> None:
        if checkpoint is None:
            return
        publish(checkpoint, self.run_dir, int(metrics["step"]), self.rank)
        if storage.is_uri(self.run_dir):
            shutil.rmtree(checkpoint, ignore_errors=True)
        dist.barrier()
        if self.rank == 0:
            for old in complete_checkpoints(self.run_dir, self.world_size)[: -self.keep]:
                fs, p = storage.resolve(old)
                fs.delete_dir(p)
        dist.barrier()


class RayEnv(_RunFolder):
    """A Ray Train worker: ranks and the process group from Ray Train, training rows through Ray Data,
    checkpoints registered with Ray Train (which keeps the last K). Resume reads the run folder, not
    ``ray.train.get_checkpoint()``: a worker that dies right after reporting can take its report
    with it before the controller has seen it."""

    def __init__(self, run_dir: str, fail_at_step: int | None = None, fail_rank: int = 1):
        import ray.train
        import ray.train.torch

        self.run_dir, self.fail_at_step, self.fail_rank = run_dir, fail_at_step, fail_rank
        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def batches(self, segments: list[Segment], micro: int, read_cpus: float) -> Iterator[dict]:
        return ray_batches(segments, micro, read_cpus=read_cpus)

    def checkpoint_dir(self, step: int) -> str:
        return tempfile.mkdtemp(prefix=f"cerbero-ckpt-{self.rank}-")

    def report(self, metrics: dict, checkpoint: str | None = None) -> None:
        import ray.train

        if checkpoint is None:
            ray.train.report(metrics)
            return

        def upload(ckpt: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
            dest = publish(ckpt.path, self.run_dir, int(metrics["step"]), self.rank)
            fs, p = storage.resolve(dest)
            return ray.train.Checkpoint(p, filesystem=fs)

        step = int(metrics["step"])
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
            checkpoint_dir_name=checkpoint_name(step),
            checkpoint_upload_fn=upload,
        )
        shutil.rmtree(checkpoint, ignore_errors=True)
        if self.rank == 0:
            self._prune_unregistered(step)

    def _prune_unregistered(self, step: int) -> None:
        """Ray Train keeps the last K of the checkpoints it registered; one written just before a
        worker died was never registered, so Ray would keep it forever: delete it (once a newer
        one is registered)."""
        import ray.train

        known = {os.path.basename(c.checkpoint.path.rstrip("/")) for c in ray.train.get_all_reported_checkpoints()}
        fs, p = storage.resolve(self.run_dir)
        for info in fs.get_file_info(pafs.FileSelector(p)):
            name = info.base_name
            if name.startswith(PREFIX) and name not in known and name < checkpoint_name(step):
                fs.delete_dir(info.path)
