"""Data-parallel training across processes started by torchrun (DistributedDataParallel).

Launch a training script with ``torchrun --nproc_per_node N script.py`` and call
``init_distributed()`` at its start. ``train_capt`` then detects the process group by
itself. Every rank computes the same seeded batch order and runs its share of each
global batch. DistributedDataParallel averages the gradients, so each optimizer step
uses the gradient of the whole batch. Epoch metrics are summed across ranks, and only
rank 0 writes checkpoints.

Without torchrun's environment variables, every function here describes or acts on a
single process and communicates nothing.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capt_lib.utils.device import resolve_device

logger = logging.getLogger(__name__)

# Environment variables that torchrun sets for every process it starts.
RANK_VAR = "RANK"
WORLD_SIZE_VAR = "WORLD_SIZE"
LOCAL_RANK_VAR = "LOCAL_RANK"
DEFAULT_TIMEOUT_S = 1800.0  # how long a collective waits for the other ranks before it fails


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the training job."""

    rank: int  # global rank, 0 .. world_size - 1
    world_size: int  # number of processes in the job, 1 without torchrun
    local_rank: int  # rank on this machine, which picks the CUDA device
    device: torch.device  # device this process trains on

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that writes checkpoints and results."""
        return self.rank == 0


@dataclass(frozen=True)
class BatchShard:
    """The rows of one global batch that this rank runs, and how its loss is weighted."""

    rows: torch.Tensor  # (b,) training rows this rank runs forward
    num_own: int  # rows that belong to this rank, 0 when ``rows`` is a borrowed placeholder
    loss_weight: float  # factor on this rank's mean loss so that DDP's gradient average is the batch mean


def init_distributed(
    device: str | torch.device | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S
) -> DistInfo:
    """Join the process group that torchrun set up, or describe a single process.

    The backend is NCCL on CUDA and Gloo on CPU. On CUDA each process takes the GPU of its
    local rank, so ``device`` selects only the device type: "auto" picks CUDA when a GPU
    is visible. Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) no process group is created.
    """
    world_size = _env_int(WORLD_SIZE_VAR, default=1)
    if world_size < 1:
        raise ValueError(f"{WORLD_SIZE_VAR}={world_size} is invalid. It must be at least 1.")
    if world_size == 1:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=resolve_device(device))

    rank = _env_int(RANK_VAR)
    local_rank = _env_int(LOCAL_RANK_VAR)
    if not 0 <= rank < world_size:
        raise ValueError(
            f"{RANK_VAR}={rank} is invalid for {WORLD_SIZE_VAR}={world_size}. It must lie in [0, {world_size})."
        )
    process_device = _process_device(device, local_rank)

    # NOTE: only the Gloo backend on CPU is exercised by the tests. The NCCL path has not been run.
    backend = "nccl" if process_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
        )
        logger.info("joined the %s process group as rank %d of %d on %s", backend, rank, world_size, process_device)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=process_device)


def current_dist_info(device: torch.device) -> DistInfo:
    """Describe the initialised process group, or a single process when there is none.

    ``device`` is where this process's model lives. The trainers call this, so a
    script only needs ``init_distributed()`` before training.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    local_rank = _env_int(LOCAL_RANK_VAR, default=0)
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def destroy_distributed() -> None:
    """Leave the process group, when one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Return ``model`` wrapped in DistributedDataParallel when the job has several ranks, else ``model``.

    The wrapper broadcasts rank 0's parameters and buffers once, at construction.
    Buffers are not broadcast again at every forward because the CAPT modules never
    change them. ``find_unused_parameters`` is on because MGDE's top-k router leaves
    some experts without a gradient in a step, and the set differs between ranks.
    """
    if not info.is_distributed:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False, find_unused_parameters=True)


def shard_batch(rows: torch.Tensor, info: DistInfo) -> BatchShard:
    """Split one global batch (B,) into contiguous parts, one per rank, and return this rank's part.

    DDP averages the ranks' gradients. Each rank's mean loss is therefore weighted by
    ``b_r * world_size / B``, which makes the average equal the gradient of the mean over
    all B rows even when the parts differ in size. A rank whose part is empty (B <
    world_size, in a short last batch) runs the batch's first row with weight 0, so that
    every rank still joins the gradient all-reduce.
    """
    if not info.is_distributed:
        return BatchShard(rows=rows, num_own=len(rows), loss_weight=1.0)
    if len(rows) == 0:
        raise ValueError("shard_batch: the global batch is empty")

    own = torch.tensor_split(rows, info.world_size)[info.rank]  # (b_r,), sizes differ by at most one
    if len(own) == 0:
        return BatchShard(rows=rows[:1], num_own=0, loss_weight=0.0)
    return BatchShard(rows=own, num_own=len(own), loss_weight=len(own) * info.world_size / len(rows))


def all_reduce_sums(values: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sum each value across ranks; return ``values`` unchanged for a single process."""
    if not info.is_distributed:
        return values

    names = sorted(values)
    # float64 keeps integer counts exact. NCCL reduces only CUDA tensors, Gloo CPU ones.
    summed = torch.tensor([float(values[name]) for name in names], dtype=torch.float64, device=info.device)
    dist.all_reduce(summed, op=dist.ReduceOp.SUM)
    return dict(zip(names, summed.tolist()))


def barrier(info: DistInfo) -> None:
    """Wait until every rank reaches this point; a no-op for a single process."""
    if not info.is_distributed:
        return
    if info.device.type == "cuda":
        dist.barrier(device_ids=[info.device.index])
    else:
        dist.barrier()


def _process_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    requested = resolve_device(device)
    if requested.type != "cuda":
        return requested

    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ValueError(
            f"{LOCAL_RANK_VAR}={local_rank} has no GPU: this machine has {count}. "
            "Start at most one process per GPU (torchrun --nproc_per_node)."
        )
    process_device = torch.device("cuda", local_rank)
    torch.cuda.set_device(process_device)
    return process_device


def _env_int(name: str, default: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None:
        if default is None:
            raise ValueError(f"environment variable {name} is not set. Launch the script with torchrun.")
        return default
    try:
        return int(raw)
    except ValueError as e:
        raise ValueError(f"environment variable {name}={raw!r} is not an integer") from e
