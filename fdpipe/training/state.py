"""Exact resume: where training is, and everything a resume needs, written atomically at step boundaries."""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import FdpipeError
from ..runtime import JsonlLog, atomic_write_bytes
from .distributed import barrier


@dataclass(frozen=True)
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
