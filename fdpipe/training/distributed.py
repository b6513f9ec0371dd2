"""One code path for 1 and N processes: under torchrun the process group is joined (NCCL on GPU, gloo on CPU) and
the model wrapped in DDP; alone, every helper here is the identity."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..runtime import Ranks, ranks_from_env


def init_distributed(device: torch.device) -> Ranks:
    """Join the torchrun process group when there is one; returns this process's rank and the world size."""
    ranks = ranks_from_env()
    if ranks.world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return ranks


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    if dist.is_initialized() and dist.get_world_size() > 1:
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def all_mean(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The mean over ranks of a float64 tensor (one all_reduce); the tensor itself when alone."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = values.to(device)
        dist.all_reduce(t)
        return t.cpu() / dist.get_world_size()
    return values


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (eval counts and loss sums); the values themselves when alone."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]
    return list(values)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
