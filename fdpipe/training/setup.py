"""What every training command does first: the device, the process group, the resume check, seeds, determinism."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import FdpipeError
from ..runtime import Ranks, resolve_device
from .distributed import init_distributed


def start_run(device_name: str, out: str | Path, seed: int, resume: bool, state: str, *, stage: str,
              settings: Any = None, inputs: dict[str, Any] | None = None) -> tuple[torch.device, Ranks, Path, Path]:
    """What every training command does first: the --out check (check_out), device, process group, the resume check,
    seeds, determinism on CPU."""
    out = Path(out)
    check_out(out, stage, settings, inputs or {})
    device = resolve_device(device_name)
    ranks = init_distributed(device)
    state_path = out / state
    if resume and not state_path.exists():
        raise FdpipeError(f"--resume: no {state} in {out}; start without --resume or point --out at the run")
    seed_everything(seed)
    if device.type == "cpu":
        deterministic(True)
    return device, ranks, out, state_path


ANOTHER = "another command"  # run_of: settings.yaml of another command's settings


def check_out(out: Path, stage: str, settings: Any, inputs: dict[str, Any]) -> None:
    """Refuse an --out whose files the run would overwrite but did not make: an input of this run (`inputs`: flag ->
    path, e.g. --init), a store, or a run of another command (`stage`; see run_of). A run writes settings.yaml,
    metrics.jsonl, train_state.pt, config.json and its plots there, whoever's they were."""
    if not out.is_dir():
        return
    real = os.path.realpath(out)
    for flag, value in inputs.items():
        if isinstance(value, str) and os.path.exists(value):
            if os.path.commonpath([real, os.path.realpath(value)]) == real:
                raise FdpipeError(f"--out {out} holds {flag} {value}, which this run would overwrite; choose a new "
                                  "--out")
    if (out / "manifest.json").exists() or (out / "manifest.draft.json").exists():
        raise FdpipeError(f"--out {out} holds a feature store, which this run would overwrite; choose a new --out")
    other = run_of(out, settings)
    if other is not None and other != stage:
        what = "another command's run" if other == ANOTHER else f"a run of fdpipe {other}"
        raise FdpipeError(f"--out {out} holds {what}, which fdpipe {stage} would overwrite; choose a new --out")


def write_settings(cfg: Any, path: str | Path) -> Path:
    """Write a run's settings.yaml: the settings dataclass as YAML that `--config` reads back to equal settings
    (secret fields left out); run_of reads it back to tell whose run a directory holds, so it is written whole or
    not at all (a crash leaves the previous one)."""
    from ..files import write_atomic
    from ..options import settings_yaml

    path = Path(path)
    write_atomic(path, settings_yaml(cfg).encode())
    return path


def run_of(out: Path, settings: Any) -> str | None:
    """The command whose run `out` holds: the stage its config.json names (written with the model); for a run that
    stopped before that, ANOTHER when its settings.yaml is not of `settings`' kind (it has fields `settings` lacks,
    and lacks some of its own); None when out holds no run that says whose it is."""
    try:
        stage = json.loads((out / "config.json").read_text()).get("fdpipe", {}).get("stage")
    except (OSError, ValueError, AttributeError):
        stage = None
    if isinstance(stage, str):
        return stage
    if settings is None or not (out / "settings.yaml").is_file():
        return None
    import yaml

    try:
        recorded = yaml.safe_load((out / "settings.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(recorded, dict):
        return None
    from ..options import meta

    fields = {f.name for f in dataclasses.fields(settings) if not meta(f).secret}  # write_settings leaves those out
    keys = set(map(str, recorded))
    return ANOTHER if keys - fields and fields - keys else None


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
