"""The one training loop of fdpipe: distill, finetune and the benchmarks all step through `Trainer`.

A stage supplies the model, its optimizer, the data of an epoch and two small functions: `prepare` turns a batch into
the model's inputs and the loss's target, `loss` scores the output. The loop owns the rest: the schedule,
accumulation, autocast, clipping, the optimizer step, the position for exact resume, the log, the progress bar and
the checkpoints. Everything it does is a function of the step, so a run killed at any point and resumed gives the
same bits as one that never stopped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn

from ..errors import FdpipeError
from ..runtime import JsonlLog, Ranks, progress
from .distributed import all_mean, wrap_ddp
from .optim import cosine_lr, set_lr
from .setup import autocast, worker_errors_one_line, write_settings
from .state import KEEP, Position, checkpoint, load_state, position, restore


class Step(NamedTuple):
    """One micro-batch as the model and the loss see it."""

    inputs: tuple[Any, ...]  # model(*inputs), under autocast
    target: Any  # handed to loss(output, target)
    samples: int  # images in the micro-batch, for samples/s
    finite: torch.Tensor | None = None  # [samples] bool on the device: is each sample's target finite
    names: list[str] | None = None  # each sample as a message names it ("image 3 view 1")


@dataclass(frozen=True)
class LoopSettings:
    """The recipe knobs the loop itself reads; each stage fills it from its own settings."""

    epochs: int
    batch_size: int
    accum_steps: int = 1
    clip_grad: float | None = None
    warmup_epochs: float | None = None
    warmup_fraction: float = 0.1  # of the run, when warmup_epochs is not given
    min_lr: float = 0.0
    max_steps: int | None = None
    save_every: int = 0  # steps; 0: at epoch ends only
    log_every: int = 10  # steps whose records reach the log together (one host sync per group, not per step)
    desc: str = "train"
    quiet: bool = False


@dataclass(frozen=True)
class Schedule:
    """Per-iteration warmup then cosine to the floor; a pure function of the step."""

    total_steps: int
    micro_per_epoch: tuple[int, ...]  # micro-batches each epoch uses: a multiple of accum_steps
    warmup: int
    peak_lr: float
    min_lr: float

    def lr(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.warmup, self.peak_lr, self.min_lr)

    def check(self, pos: Position, batch_size: int, path: Path) -> None:
        """Refuse a resume position that is no place in this schedule: a sample past its epoch's end (a position
        after the last epoch is the end of a finished run, which a resume with more --epochs continues)."""
        epochs = len(self.micro_per_epoch)
        if pos.epoch < epochs and pos.sample_in_epoch > self.micro_per_epoch[pos.epoch] * batch_size:
            raise FdpipeError(f"--resume: {path} is at sample {pos.sample_in_epoch:,} of epoch {pos.epoch}, which has "
                              f"{self.micro_per_epoch[pos.epoch] * batch_size:,} samples in this run; {KEEP}")


def make_schedule(loop: LoopSettings, samples_per_epoch: int | Callable[[int], int], peak_lr: float) -> Schedule:
    """Steps of each epoch from this rank's samples in it; refuses a batch that an epoch cannot fill once.

    `samples_per_epoch` is a count, or a function of the epoch where it varies (streamed stores under DDP).
    """
    counts = ([samples_per_epoch(e) for e in range(loop.epochs)] if callable(samples_per_epoch)
              else [samples_per_epoch] * loop.epochs)
    steps = [n // loop.batch_size // loop.accum_steps for n in counts]
    if min(steps) < 1:
        raise FdpipeError(f"--batch-size {loop.batch_size} x --accum-steps {loop.accum_steps} is more than the "
                          f"{min(counts)} samples per epoch on this rank; lower it or use more images")
    total = sum(steps)
    if loop.max_steps:
        total = min(total, loop.max_steps)
    warmup = int(round(loop.warmup_epochs * steps[0] if loop.warmup_epochs is not None
                       else loop.warmup_fraction * total))
    return Schedule(total, tuple(s * loop.accum_steps for s in steps), warmup, peak_lr, loop.min_lr)


@dataclass
class Trainer:
    """Steps `model` with `optimizer` on micro-batches: `train_step` is one optimizer step, `fit` a whole run.

    `model` holds every trained parameter (DDP wraps it when there are several processes); `prepare(batch, pos)`
    and `loss(output, target) -> (loss, {part: value})` are the stage's.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    prepare: Callable[[Any, Position], Step]
    loss: Callable[[Any, Any], tuple[torch.Tensor, dict[str, float]]]
    device: torch.device
    loop: LoopSettings
    ranks: Ranks = field(default_factory=Ranks)
    ddp: nn.Module = field(init=False)

    def __post_init__(self) -> None:
        self.ddp = wrap_ddp(self.model, self.device)

    def micro_step(self, batch: Any, pos: Position) -> tuple[torch.Tensor, dict[str, float], Step]:
        """Forward and backward of one micro-batch; the gradient is scaled for accumulation."""
        step = self.prepare(batch, pos)
        with autocast(self.device):
            output = self.ddp(*step.inputs)
        loss, parts = self.loss(output, step.target)
        (loss / self.loop.accum_steps).backward()
        return loss, parts, step

    def optimizer_step(self) -> torch.Tensor | None:
        """Clip, step and clear the gradients; returns the norm before clipping (None without clipping)."""
        norm = None
        if self.loop.clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.loop.clip_grad)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def train_step(self, batch: Any, pos: Position = Position()) -> torch.Tensor:
        """One micro-batch and one optimizer step (accumulation 1): what the benchmarks time."""
        loss, _, _ = self.micro_step(batch, pos)
        self.optimizer_step()
        return loss

    def fit(self, run: "RunFiles", schedule: Schedule, data: Callable[[int, int], Iterable[Any]],
            pos: Position = Position(), log_fields: dict[str, Any] | None = None,
            on_epoch_end: Callable[["Trainer", Position, bool, bool], None] | None = None) -> Position:
        """Train from `pos` to the end of the schedule; returns where it stopped.

        data(epoch, first_sample) gives this rank's batches of that epoch from that sample on.
        on_epoch_end(trainer, pos, complete, last) runs after each epoch (and after an interrupted one).
        """
        loop = self.loop
        self.bar = progress(total=schedule.total_steps, desc=loop.desc, unit="step",
                            disable=loop.quiet or not self.ranks.is_main)
        self.bar.update(pos.step)
        pending = PendingLog(run.log, self.bar, self.device, self.ranks.world, log_fields or {})
        while pos.step < schedule.total_steps and pos.epoch < loop.epochs:
            micro = pos.sample_in_epoch // loop.batch_size
            limit = schedule.micro_per_epoch[pos.epoch]
            self.model.train()
            self.optimizer.zero_grad(set_to_none=True)
            pending.restart_clock()  # the last epoch's evaluation and checkpoint are not training time
            with worker_errors_one_line():
                for batch in data(pos.epoch, pos.sample_in_epoch):
                    if micro >= limit or pos.step >= schedule.total_steps:
                        break
                    lr = schedule.lr(pos.step)
                    set_lr(self.optimizer, lr)
                    loss, parts, step = self.micro_step(batch, pos)
                    micro += 1
                    pending.watch(pos, loss, step)
                    if micro % loop.accum_steps:
                        continue
                    grad_norm = self.optimizer_step()
                    pos = Position(pos.epoch, micro * loop.batch_size, pos.step + 1)
                    pending.add(pos, lr, loss, grad_norm, parts)
                    self.bar.update(1)
                    if len(pending.steps) >= loop.log_every:
                        pending.flush()
                    if loop.save_every and pos.step % loop.save_every == 0:
                        pending.flush()
                        run.save(self, pos)
            pending.flush()
            interrupted = pos.step >= schedule.total_steps and micro < limit
            if on_epoch_end is not None:
                last = pos.epoch + 1 >= loop.epochs or pos.step >= schedule.total_steps
                on_epoch_end(self, pos, not interrupted, last)
            if interrupted:
                run.save(self, pos)
                break
            pos = Position(pos.epoch + 1, 0, pos.step)
            run.save(self, pos)
        self.bar.close()
        return pos


class PendingLog:
    """Steps whose log records wait on the device: losses and gradient norms stay tensors until `flush`, which
    brings a whole group to the host at once (and averages the losses over ranks in one all_reduce).

    Reading a CUDA tensor's value waits for the GPU; doing it every step would stall the queue of kernels. So
    non-finite targets and losses are found at the flush too, which runs before every checkpoint: the run stops
    there with one line naming the step and the samples, and nothing trained on them is saved.
    """

    def __init__(self, log: JsonlLog, bar: Any, device: torch.device, world: int, fields: dict[str, Any]):
        self.log, self.bar, self.device, self.world, self.fields = log, bar, device, world, fields
        self.steps: list[tuple[Position, float, dict[str, Any], list[str]]] = []  # lr, host parts, device parts' names
        self.values: list[torch.Tensor] = []  # per step: loss, grad norm (NaN without clipping), tensor parts
        self.watched: list[tuple[Position, torch.Tensor, Step]] = []  # per micro-batch: loss and target flags
        self.samples, self.t_last = 0, time.time()

    def restart_clock(self) -> None:
        """samples_per_s counts from here: call it after work between steps that is not training."""
        self.t_last = time.time()

    def watch(self, pos: Position, loss: torch.Tensor, step: Step) -> None:
        self.samples += step.samples
        self.watched.append((pos, loss.detach(), step))

    def check_finite(self) -> None:
        """Stop on the first micro-batch whose targets or loss are not finite (one wait, with the flush's)."""
        if not self.watched:
            return
        flags = [torch.isfinite(loss).reshape(1) if s.finite is None else torch.cat([s.finite, torch.isfinite(
            loss).reshape(1)]) for _, loss, s in self.watched]
        ok = torch.cat(flags).cpu()
        at = 0
        for (pos, _, step), f in zip(self.watched, flags):
            good, at = ok[at:at + len(f)], at + len(f)
            if bool(good.all()):
                continue
            bad = [] if step.finite is None else [i for i in range(len(good) - 1) if not good[i]]
            names = step.names or [f"sample {i} of the batch" for i in range(len(good) - 1)]
            what = (f"the targets of {', '.join(names[i] for i in bad[:3])}"
                    f"{' and more' * (len(bad) > 3)} are not finite (NaN or inf): the store holds broken values; "
                    "run `fdpipe store verify --deep`" if bad else "the loss is not finite (NaN or inf); lower --lr "
                    "or check the data")
            raise FdpipeError(f"step {pos.step + 1} (epoch {pos.epoch}): {what}")
        self.watched = []

    def add(self, pos: Position, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor | None,
            parts: dict[str, Any]) -> None:
        """One step's record; its loss and the parts that are tensors (per-teacher losses) wait on the device."""
        norm = grad_norm if grad_norm is not None else torch.tensor(float("nan"))
        live = [k for k, v in parts.items() if isinstance(v, torch.Tensor)]
        self.steps.append((pos, lr, {k: v for k, v in parts.items() if k not in live}, live))
        self.values.append(torch.stack([v.detach().float().reshape(()).to(loss.device)
                                        for v in (loss, norm, *(parts[k] for k in live))]))

    def flush(self) -> None:
        self.check_finite()
        if not self.steps:
            return
        host = torch.stack(self.values).double().cpu()  # the one wait for the device per group
        # the loss and its parts are each rank's own: their mean over ranks (one all_reduce); the gradient norm is
        # taken after DDP averaged the gradients, so every rank already holds the same one
        means = all_mean(torch.cat([host[:, :1], host[:, 2:]], 1).contiguous(), self.device).tolist()
        norms = host[:, 1].tolist()
        now = time.time()
        rate = self.samples * self.world / max(now - self.t_last, 1e-9)
        for (pos, lr, fixed, live), mean, norm in zip(self.steps, means, norms):
            self.log.write(**self.fields, step=pos.step, epoch=pos.epoch, loss=mean[0], lr=lr,
                           grad_norm=None if norm != norm else norm, samples_per_s=rate,
                           **{k: float(v) for k, v in fixed.items()}, **dict(zip(live, mean[1:])))
        self.bar.set_postfix(loss=f"{means[-1][0]:.4f}", lr=f"{self.steps[-1][1]:.2e}")
        self.steps, self.values, self.samples, self.t_last = [], [], 0, now


@dataclass
class RunFiles:
    """A run directory's resume state and metrics log, and what a resume must agree on.

    `agree` is saved with every checkpoint; `check(state)` refuses a resume whose saved values differ. The main
    rank holds the folder's lock while the object lives, so a second run into the same --out is refused in one line
    instead of interleaving its metrics and checkpoints with this one's.
    """

    out: Path
    state_path: Path
    ranks: Ranks
    agree: dict[str, Any]
    check: Callable[[dict[str, Any]], None]
    log: JsonlLog = field(init=False)

    def __post_init__(self) -> None:
        if self.ranks.is_main:
            from ..locks import lock_folder

            self._lock = lock_folder(self.out, f"--out {self.out} is in use by another run; wait for it to finish, "
                                               "or choose another --out")
        self.log = JsonlLog(self.out / "metrics.jsonl", enabled=self.ranks.is_main)

    def begin(self, trainer: Trainer, resume: bool, settings: Any = None,
              keep: Callable[[dict[str, Any], Position], bool] | None = None,
              schedule: Schedule | None = None) -> Position:
        """Restore a resumed run (the log cut back to its checkpoint) or start a fresh one; write the settings.

        A resumed state is checked before any of it is used: what checkpoint() saves, and a position inside
        `schedule`'s epochs."""
        if resume:
            state = load_state(self.state_path, tuple(self.agree))
            self.check(state)
            if schedule is not None:
                schedule.check(position(state, self.state_path), trainer.loop.batch_size, self.state_path)
            pos = restore(state, trainer.model, trainer.optimizer, self.log, self.ranks.is_main, keep=keep,
                          path=self.state_path)
        else:
            pos = Position()
            if self.ranks.is_main:
                self.out.mkdir(parents=True, exist_ok=True)
                self.log.path.unlink(missing_ok=True)
        if settings is not None and self.ranks.is_main:
            write_settings(settings, self.out / "settings.yaml")
        return pos

    def save(self, trainer: Trainer, pos: Position) -> None:
        checkpoint(self.state_path, trainer.model, trainer.optimizer, pos, self.ranks.is_main, **self.agree,
                   world=self.ranks.world)
