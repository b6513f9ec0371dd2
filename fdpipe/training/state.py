"""Exact resume: where training is, and everything a resume needs, written atomically at step boundaries."""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import FdpipeError
from ..runtime import JsonlLog, atomic_write_bytes, gist, read_torch
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


KEEP = "nothing was changed; restore the file from a copy, or start without --resume in a new --out"
_PARTS = ("model", "optimizer", "position", "rng")  # what checkpoint() saves, besides what a resume must agree on


def load_state(path: Path, agree: tuple[str, ...] = ()) -> dict[str, Any]:
    """The resume state at `path`, checked to be one that checkpoint() wrote (with the `agree` keys too) before any
    of it is used: tensors and plain values only (weights_only: a pickle's code is never run), a whole file."""
    if not path.exists():
        raise FdpipeError(f"--resume: no {path.name} in {path.parent}; start without --resume or point --out at the run")
    state = read_torch(path, f"--resume: {path}", KEEP)
    if not isinstance(state, dict):
        raise FdpipeError(f"--resume: {path} holds a {type(state).__name__}, not a resume state; {KEEP}")
    if missing := [k for k in (*_PARTS, *agree) if k not in state]:
        raise FdpipeError(f"--resume: {path} lacks {', '.join(missing)}: it is not a resume state fdpipe wrote; {KEEP}")
    bad = [k for k in ("model", "optimizer", "rng") if not isinstance(state[k], dict)]
    if not bad and not (isinstance(state["rng"].get("torch"), torch.Tensor) and state["rng"]["torch"].dtype ==
                        torch.uint8):
        bad = ["rng.torch"]
    if bad:
        raise FdpipeError(f"--resume: {path}: {bad[0]} is not what fdpipe saves there; {KEEP}")
    position(state, path)
    return state


def position(state: dict[str, Any], path: Path | str) -> Position:
    """The state's Position: its three fields, each a whole number, none negative."""
    pos = state["position"]
    names = [f.name for f in dataclasses.fields(Position)]
    if not isinstance(pos, dict) or sorted(pos) != sorted(names) or not all(
            type(pos[n]) is int and pos[n] >= 0 for n in names):
        raise FdpipeError(f"--resume: {path}: position is {pos!r:.200}, not {', '.join(names)} as whole numbers of "
                          f"at least 0; {KEEP}")
    return Position(**pos)


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
            keep: Callable[[dict[str, Any], Position], bool] | None = None, path: Path | str = "the state") -> Position:
    """Continue where a checkpoint stopped; the log is cut back to it, since the steps after it run again.

    keep(record, position): which log lines survive [those of steps up to the checkpoint's]; path: the state's
    file, which messages name.
    """
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise FdpipeError(f"--resume: {path} does not fit this run's model ({gist(e)}); {KEEP}") from None
    pos = position(state, path)
    if is_main:
        keep = keep or (lambda r, p: r["step"] <= p.step)
        records = log.read()
        try:
            kept = [r for r in records if keep(r, pos)]
        except (KeyError, TypeError) as e:
            raise FdpipeError(f"{log.path} holds a record fdpipe did not write ({type(e).__name__}: {gist(e)}); "
                              "remove or fix that line, then rerun") from None
        log.rewrite(kept)
    return pos
