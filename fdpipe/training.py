"""What distill and finetune share: process group, optimizer and schedule, autocast, resume state, plots.

One code path for 1 and N processes: under torchrun the process group is initialised (NCCL on GPU, gloo on CPU)
and the model is wrapped in DDP; alone, nothing changes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .errors import FdpipeError
from .runtime import JsonlLog, Ranks, atomic_write_bytes, ranks_from_env


def start_run(device_name: str, out: str | Path, seed: int, resume: bool, state: str) -> tuple[torch.device, Ranks, Path, Path]:
    """What every training command does first: device, process group, the resume check, seeds, determinism on CPU."""
    from .runtime import resolve_device

    device = resolve_device(device_name)
    ranks = init_distributed(device)
    out = Path(out)
    state_path = out / state
    if resume and not state_path.exists():
        raise FdpipeError(f"--resume: no {state} in {out}; start without --resume or point --out at the run")
    seed_everything(seed)
    if device.type == "cpu":
        deterministic(True)
    return device, ranks, out, state_path


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


def all_mean(value: float, device: torch.device) -> float:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item()) / dist.get_world_size()
    return value


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few numbers over ranks (eval counts and loss sums); the values themselves when alone."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return [float(v) for v in t.tolist()]
    return list(values)


@contextlib.contextmanager
def worker_errors_one_line():
    """An FdpipeError raised in a DataLoader worker comes back wrapped in the worker's traceback; keep its one line."""
    try:
        yield
    except FdpipeError as e:
        text = str(e)
        if "\n" not in text:
            raise
        last = [ln.strip() for ln in text.splitlines() if ln.strip()][-1]
        raise type(e)(last.split(": ", 1)[1] if last.split(": ", 1)[0].endswith("Error") else last) from None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deterministic(on: bool = True) -> None:
    torch.use_deterministic_algorithms(on, warn_only=True)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def scaled_lr(base_lr: float, global_batch: int, reference: int) -> float:
    """The linear scaling rule: lr = base * batch / reference (FD: 1.2e-3 x batch/2048)."""
    return base_lr * global_batch / reference


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float = 0.0) -> float:
    """Per-iteration linear warmup then cosine decay to `floor`; a pure function of the step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, t)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every group's lr to lr x its `lr_scale` (timm's layer-decay groups carry one; others default to 1)."""
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def adamw(param_groups: Iterable[dict[str, Any]], lr: float, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    return torch.optim.AdamW(list(param_groups), lr=lr, betas=betas)


def weight_decay_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """No decay on 1-D parameters (norms, biases, layer scale), tokens and position tables (timm's rule)."""
    from timm.optim import param_groups_weight_decay

    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    return param_groups_weight_decay(model, weight_decay, no_weight_decay_list=skip)


# --------------------------------------------------------------------------------------------------------- state
@dataclass
class Position:
    """Where training is: resume restores exactly this and continues on the same samples."""

    epoch: int = 0
    sample_in_epoch: int = 0
    step: int = 0


def save_state(path: Path, **state: Any) -> None:
    """torch.save to a temporary file, then os.replace: a crash never leaves half a state."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_state(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise FdpipeError(f"--resume: no {path.name} in {path.parent}; start without --resume or point --out at the run")
    return torch.load(path, map_location="cpu", weights_only=True)


def rng_state() -> dict[str, Any]:
    """The torch RNG streams training draws from (drop path, mixup); data order has no state to save."""
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, position: Position, is_main: bool,
               **extra: Any) -> None:
    """Everything a resume needs (weights, optimizer, position, RNG streams, what it must agree on), main rank only."""
    if is_main:
        save_state(path, model=model.state_dict(), optimizer=optimizer.state_dict(),
                   position=dataclasses.asdict(position), rng=rng_state(), **extra)
    barrier()


def restore(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, log: JsonlLog, is_main: bool,
            keep: Callable[[dict[str, Any], Position], bool] | None = None) -> Position:
    """Continue where a checkpoint stopped; the log is cut back to it, since the steps after it run again.

    keep(record, position): which log lines survive [those of steps up to the checkpoint's].
    """
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    pos = Position(**state["position"])
    set_rng_state(state["rng"])
    if is_main:
        keep = keep or (lambda r, p: r["step"] <= p.step)
        log.path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in log.read() if keep(r, pos)))
    return pos


# --------------------------------------------------------------------------------------------------------- plots
def plot_curves(path: Path, series: dict[str, tuple[list[float], list[float]]], xlabel: str, ylabel: str,
                title: str) -> None:
    """One PNG with a line per series: {label: (x, y)}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for label, (x, y) in series.items():
        ax.plot(x, y, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
