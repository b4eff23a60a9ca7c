"""``memopt-func lm`` under ``torchrun``: one rank of a DDP or FSDP2 process group."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from . import common

# Every collective waits at most this long, so a rank that died or hung fails the others.
DIST_TIMEOUT_S = 120


@dataclass(frozen=True)
class Dist:
    """This process's part of a run: the whole of it (``mode`` None), or one rank of a process
    group that wraps the model for ``mode`` ("ddp" or "fsdp")."""

    mode: str | None = None
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None
    mesh: Any = None  # FSDP2's one-dimensional device mesh over every rank

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch: int) -> slice:
        """This rank's sequences of a global batch (``batch`` is a multiple of ``world``)."""
        per = batch // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def wrap(self, model: nn.Module) -> nn.Module:
        """What the training loop calls forward on: the model itself (one process; FSDP2, which
        shards the model in place), or a ``DistributedDataParallel`` around it."""
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in model.blocks:
                fully_shard(block, mesh=self.mesh)
            fully_shard(model, mesh=self.mesh)
        return model

    def sum(self, value: Tensor) -> Tensor:
        """``value`` summed over the ranks (every rank gets the same result)."""
        if self.mode is not None:
            import torch.distributed as dist

            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value


@contextmanager
def distributed(mode: str | None) -> Iterator[Dist]:
    """The process group of a ``--ddp`` / ``--fsdp`` run, destroyed on the way out (on errors too).

    Under ``torchrun`` the rank, world size and local rank come from its environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, rendezvous at ``MASTER_ADDR:MASTER_PORT``). Without it
    (``WORLD_SIZE`` unset) the run is a world of one process, grouped through a file store in a
    temporary folder: the wrapped model and every collective, over one rank. The backend is nccl
    on ``cuda:LOCAL_RANK`` when CUDA is available, else gloo on the CPU."""
    if mode is None:
        yield Dist()
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise common.CLIError(f"--{mode} needs torch.distributed, which this torch build lacks")
    env = os.environ
    if "WORLD_SIZE" in env:
        missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        if missing:
            raise common.CLIError(f"--{mode}: WORLD_SIZE is set but {', '.join(missing)} not; start the command with torchrun")
        rank, world, local_rank = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"])
    else:
        rank, world, local_rank = 0, 1, 0
    cuda = torch.cuda.is_available()
    backend = "nccl" if cuda else "gloo"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=DIST_TIMEOUT_S)
    with tempfile.TemporaryDirectory(prefix="memopt-lm-") as folder:
        if "WORLD_SIZE" in env:
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, timeout=timeout)
        else:
            store = dist.FileStore(os.path.join(folder, "store"), 1)
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        try:
            mesh = None
            if mode == "fsdp":
                from torch.distributed.device_mesh import init_device_mesh

                mesh = init_device_mesh(device.type, (world,))
            yield Dist(mode, rank, world, device, backend, mesh)
        finally:
            dist.destroy_process_group()
