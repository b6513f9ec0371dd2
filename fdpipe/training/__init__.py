"""The training engine shared by distill and finetune: one loop (`loop.Trainer`), its schedule, exact resume
state, the process group and the plots. No stage is imported here."""

from .distributed import all_mean, all_sum, barrier, init_distributed, unwrap, wrap_ddp
from .loop import LoopSettings, RunFiles, Schedule, Step, Trainer, make_schedule
from .optim import adamw, cosine_lr, fd_no_weight_decay, scaled_lr, set_lr, weight_decay_groups
from .plots import plot_curves
from .setup import (autocast, deterministic, seed_everything, start_run, worker_errors_one_line,
                    write_settings)
from .state import Position, checkpoint, load_state, restore, rng_state, save_state, set_rng_state

__all__ = [
    "all_mean", "all_sum", "barrier", "init_distributed", "unwrap", "wrap_ddp",
    "LoopSettings", "RunFiles", "Schedule", "Step", "Trainer", "make_schedule",
    "adamw", "cosine_lr", "fd_no_weight_decay", "scaled_lr", "set_lr", "weight_decay_groups", "plot_curves",
    "autocast", "deterministic", "seed_everything", "start_run", "worker_errors_one_line", "write_settings",
    "Position", "checkpoint", "load_state", "restore", "rng_state", "save_state", "set_rng_state",
]
