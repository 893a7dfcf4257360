"""Where the training loop runs: under Ray Train, or in plain processes (torchrun, one process).

The loop in :mod:`cerbero_ray.train.loop` needs five things from its surroundings: its rank and
device, its micro-batches, the latest checkpoint, a place to write a checkpoint, and a way to
publish metrics and checkpoints. :class:`RayEnv` takes them from Ray Train and Ray Data;
:class:`LocalEnv` from ``torch.distributed`` environment variables and the run folder itself, so
the same loop runs on a machine without Ray (GPU benchmarks).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator

import pyarrow.fs as pafs
import torch
import torch.distributed as dist

from cerbero_ray import storage
from cerbero_ray.train.checkpoint import PREFIX, checkpoint_name, complete_checkpoints, publish
from cerbero_ray.train.plan import Segment
from cerbero_ray.train.reader import local_batches, ray_batches

class _RunFolder:
    """Resume from the run folder: the newest checkpoint every rank marked complete."""

    run_dir: str
    world_size: int

    def latest_checkpoint(self) -> str | None:
        """A local folder holding it (downloaded when the run folder is a URI), or None."""
        done = complete_checkpoints(self.run_dir, self.world_size)
        return storage.local_copy(done[-1]) if done else None


class LocalEnv(_RunFolder):
    """A torchrun process, or a single process (world size 1), writing into ``run_dir`` itself."""

    def __init__(self, run_dir: str, keep: int = 2):
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
            for old in complete_checkpoints(self.run_dir, self.world_size)[:-self.keep]:
                fs, p = storage.resolve(old)
                fs.delete_dir(p)
        dist.barrier()


class RayEnv(_RunFolder):
    """A Ray Train worker: ranks and the process group from Ray Train, rows through Ray Data,
    checkpoints registered with Ray Train (which keeps the last K). Resume reads the run folder, not
    ``ray.train.get_checkpoint()``: a worker that dies right after reporting can take its report
    with it before the controller has seen it."""

    def __init__(self, run_dir: str):
        import ray.train
        import ray.train.torch

        self.run_dir = run_dir
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
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint),
                         checkpoint_dir_name=checkpoint_name(step), checkpoint_upload_fn=upload)
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
