"""Where code runs: device choice, process rank and world size, progress bars and run-directory files.

One code path serves one process and N processes: the rank comes from torchrun (RANK/WORLD_SIZE) or Slurm
(SLURM_PROCID/SLURM_NTASKS), defaulting to a world of one. No launcher of our own.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from .errors import FdpipeError


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when there is one (this rank's LOCAL_RANK device under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise FdpipeError("--device cuda was asked for but no CUDA device is visible; use --device cpu or auto")
        if name == "cuda" and "LOCAL_RANK" in os.environ:
            name = f"cuda:{int(os.environ['LOCAL_RANK'])}"
    return torch.device(name)


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: dict[str, str] | None = None) -> Ranks:
    """torchrun's RANK/WORLD_SIZE, else Slurm's SLURM_PROCID/SLURM_NTASKS, else a single process."""
    env = os.environ if env is None else env
    for r, w in (("RANK", "WORLD_SIZE"), ("SLURM_PROCID", "SLURM_NTASKS")):
        if r in env and w in env:
            ranks = Ranks(int(env[r]), int(env[w]))
            if not 0 <= ranks.rank < ranks.world:
                raise FdpipeError(f"{r}={ranks.rank} is outside {w}={ranks.world}; check the launcher's environment")
            return ranks
    return Ranks()


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             disable: bool = False):
    """A tqdm bar with items/s and ETA on stderr; off when `disable` (callers pass it on non-main ranks and for
    --quiet) or when TQDM_DISABLE is set in the environment."""
    from tqdm.auto import tqdm

    off = disable or bool(os.environ.get("TQDM_DISABLE"))
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=off, dynamic_ncols=True, file=sys.stderr,
                smoothing=0.1)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside `path` and os.replace it: a crash never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


class JsonlLog:
    """Append-only metrics log (one JSON object a line) in a run directory."""

    def __init__(self, path: str | Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **record: Any) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        return [json.loads(line) for line in self.path.read_text().splitlines() if line.strip()]
