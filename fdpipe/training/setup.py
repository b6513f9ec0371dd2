"""What every training command does first: the device, the process group, the resume check, seeds, determinism."""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import torch

from ..errors import FdpipeError
from ..runtime import Ranks, resolve_device
from .distributed import init_distributed


def start_run(device_name: str, out: str | Path, seed: int, resume: bool, state: str) -> tuple[torch.device, Ranks, Path, Path]:
    """What every training command does first: device, process group, the resume check, seeds, determinism on CPU."""
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def deterministic(on: bool = True) -> None:
    torch.use_deterministic_algorithms(on, warn_only=True)


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, nothing on CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
