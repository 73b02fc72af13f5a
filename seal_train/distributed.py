"""Process-group setup for runs launched by torchrun, and the device of each process."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """A device or precision setting this machine cannot honour."""


@dataclass(frozen=True)
class DistributedContext:
    """Rank, world size and device of this process; world_size 1 means no process group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_process_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, *, local_rank: int = 0) -> torch.device:
    """Turn "auto", "cpu", "cuda" or "cuda:<index>" into a device, checking that it exists."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise DeviceError(f"invalid device {name!r}; use auto, cpu, cuda or cuda:<index>") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device} does not exist; this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise DeviceError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:<index>")
    return device


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError as error:
        raise DeviceError(f"environment variable {name}={value!r} is not an integer") from error


def setup_distributed(device_name: str) -> DistributedContext:
    """Join the process group that torchrun describes in RANK, WORLD_SIZE and LOCAL_RANK.

    A process group the caller created already is used as it is. Without one and without those
    variables (or with WORLD_SIZE=1) the run is a single process. The backend is NCCL on CUDA
    and gloo on CPU.
    """
    local_rank = _env_int("LOCAL_RANK", 0)
    device = resolve_device(device_name, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_available() and dist.is_initialized():
        return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, device)

    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    if world_size <= 1:
        return DistributedContext(0, 1, 0, device)

    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
    log.info("joined process group: rank %d of %d, backend %s, device %s", rank, world_size, backend, device)
    return DistributedContext(rank, world_size, local_rank, device, owns_process_group=True)


def teardown_distributed(context: DistributedContext) -> None:
    """Destroy the process group if setup_distributed created it."""
    if context.owns_process_group and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: DistributedContext) -> None:
    if context.distributed:
        dist.barrier()


def wrap_model(model: nn.Module, context: DistributedContext, *, sync_bn: bool) -> nn.Module:
    """Wrap the model in DistributedDataParallel for multi-process runs, with SyncBatchNorm on request (CUDA only)."""
    if not context.distributed:
        if sync_bn:
            log.warning("sync_bn has no effect in a single-process run")
        return model
    if sync_bn:
        if context.device.type != "cuda":
            raise DeviceError("sync_bn needs CUDA (SyncBatchNorm has no CPU implementation); drop --sync-bn")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def all_reduce_sum(values: torch.Tensor, context: DistributedContext) -> torch.Tensor:
    """Sum a tensor over all processes (a no-op for a single process)."""
    if context.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def any_process(flag: bool, context: DistributedContext) -> bool:
    """Return True on every process when flag is True on at least one."""
    if not context.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=context.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)
