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
from .files import write_atomic


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
    """Write to a temporary file beside `path` and os.replace it: a crash never leaves half a file, and a write the
    disk refuses (full, read-only, a file-size limit) leaves the old file as it was and no temporary file; its
    OSError names `path`, not the temporary file."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data)


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
        """The records; a last line cut short (a crash or a full disk while it was appended: no newline after it)
        is left out, since it is of a step after the last checkpoint. Any other line that is not a JSON object is
        refused, naming it."""
        if not self.path.exists():
            return []
        text = self.path.read_text(errors="replace")
        lines = text.splitlines()
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                if i == len(lines) and not text.endswith("\n"):
                    break
                raise FdpipeError(f"{self.path} line {i} is not JSON ({e}); remove or fix that line, then rerun") \
                    from None
            if not isinstance(record, dict):
                raise FdpipeError(f"{self.path} line {i} is not a JSON object; remove or fix that line, then rerun")
            records.append(record)
        return records

    def rewrite(self, records: Iterable[dict[str, Any]]) -> None:
        """Replace the log with `records`, atomically (a resume cuts it back to its checkpoint)."""
        atomic_write_bytes(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode())


def read_torch(path: Path, what: str, todo: str) -> Any:
    """torch.load with weights_only (a pickle's code is never run), refusing a file it cannot read in one line."""
    import pickle
    import warnings

    try:
        with warnings.catch_warnings():  # the unpickler warns about the protocol of a file it then refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
    except OSError:
        raise
    except pickle.UnpicklingError:
        raise FdpipeError(f"{what} holds objects other than tensors and plain values (it may hold code, which fdpipe "
                          f"never runs); {todo}") from None
    except Exception as e:  # noqa: BLE001 - torch raises RuntimeError, EOFError, IndexError... on a broken file
        raise FdpipeError(f"{what} is truncated or not a torch checkpoint ({gist(e)}); {todo}") from None


def gist(e: BaseException) -> str:
    """An exception's first sentence, short: torch's messages run to paragraphs of advice."""
    line = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    return line.split(". ")[0].rstrip(".")[:160]
