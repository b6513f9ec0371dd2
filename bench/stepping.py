"""distill's training step, timed: whole runs through `fdpipe distill`, or the engine's step one at a time."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .timing import CLK_TCK, median, torch_threads


def distill_steps(cfg, skip: int, targets: dict | None = None) -> dict[str, Any]:
    """Run fdpipe's distill(cfg) (targets: {store url: reader} read in the stores' place); per-step rates from its
    metrics.jsonl with the first `skip` steps dropped."""
    from fdpipe.distill.train import distill

    t0 = time.time()
    res = distill(cfg, targets=targets)
    wall = time.time() - t0
    recs = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["samples_per_s"] for r in recs[skip:]] or [r["samples_per_s"] for r in recs]
    samples_per_s = median(rates)
    return {"samples_per_s": samples_per_s, "steps_per_s": samples_per_s / cfg.batch_size,
            "steps": len(recs), "measured_steps": len(rates), "wall_s": wall,
            "losses": [r["loss"] for r in recs], "final_loss": res.get("final_loss")}


def distill_trainer(device: torch.device, student: str, image_size: int, channels: int, grid, prefix: int, data,
                    teacher=None, seed: int = 0, lr: float = 1e-4):
    """The engine's Trainer with distill's step, as `fdpipe distill` builds it (a fixed lr: no schedule here).

    data: the `fdpipe.replay.Replay` whose batches it trains on (it normalizes views and dequantizes targets), of
    one teacher; teacher: that teacher live (online), or None.
    """
    from fdpipe.distill.train import distill_step
    from fdpipe.models import Distiller, create_student
    from fdpipe.training import LoopSettings, Trainer, adamw, weight_decay_groups

    torch.manual_seed(seed)
    s, _ = create_student(student, image_size=image_size)
    name = data.teachers[0]  # distill's step takes the mapping of one teacher, keyed as the replay names it
    model = Distiller(s, {name: (channels, tuple(grid), prefix)}).to(device)
    skip = {f"student.{n}" for n in s.no_weight_decay()} if hasattr(s, "no_weight_decay") else set()
    model.no_weight_decay = lambda: skip
    prepare, loss = distill_step(model, data, device, None if teacher is None else {name: teacher})
    return Trainer(model, adamw(weight_decay_groups(model, 0.05), lr), prepare, loss, device,
                   LoopSettings(epochs=1, batch_size=1, clip_grad=3.0))


def view_transform(student: str, image_size: int):
    """The student's view transform, as distill derives it from the student's data config."""
    from fdpipe.models import create_student
    from fdpipe.replay import student_transform

    return student_transform(create_student(student, image_size=image_size)[0], image_size)


class StepLoop:
    """fdpipe distill's training step, one step at a time, so that two or three target sources alternate step by step.

    The step is the engine's own (`fdpipe.training.Trainer.train_step` with distill's prepare and loss: Distiller,
    fd_loss, AdamW with timm's decay groups, autocast, clipping at 3.0) on the batches of `data.loader(epoch)`,
    the DataLoader distill builds for that epoch. Each step is timed from asking for the batch to the optimizer
    step and `loss.item()` (distill logs the loss every step), so data waits count. The first step after a new
    epoch's DataLoader starts is flagged cold.
    """

    def __init__(self, device: torch.device, student: str, image_size: int, channels: int, grid, prefix: int,
                 data, batch_size: int, workers: int = 0, teacher=None, seed: int = 0, lr: float = 1e-4):
        self.trainer = distill_trainer(device, student, image_size, channels, grid, prefix, data, teacher, seed, lr)
        self.model = self.trainer.model
        self.device, self.teacher = device, teacher
        self.loader = lambda epoch: data.loader(epoch, 0, batch_size, workers, device.type == "cuda")
        self.epoch, self.it = 0, None
        self.cpu: list[float] = []  # CPU seconds of each warm_step
        self.last_cpu = 0.0

    def _batch(self) -> tuple[dict, bool]:
        cold = False
        while True:
            if self.it is None:
                self.it, cold = iter(self.loader(self.epoch)), True
            try:
                return next(self.it), cold
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1

    def _workers_cpu(self) -> float:
        """CPU seconds used so far by this loop's DataLoader worker processes (from /proc; 0 where unknown)."""
        total = 0.0
        for w in getattr(self.it, "_workers", None) or []:
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = Path(f"/proc/{w.pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        return total

    def step(self) -> tuple[float, bool, float]:
        """(seconds, cold, loss) of one optimizer step; self.last_cpu holds its CPU seconds (this process's threads
        plus the loader workers')."""
        self.model.train()
        c0, w0 = time.process_time(), self._workers_cpu()
        t0 = time.perf_counter()
        batch, cold = self._batch()
        if cold:
            w0 = self._workers_cpu()
        loss = self.trainer.train_step(batch)
        value = loss.item()
        dt = time.perf_counter() - t0
        self.last_cpu = time.process_time() - c0 + self._workers_cpu() - w0
        return dt, cold, value

    def warm_step(self) -> float:
        """Seconds of one steady-state step: steps that had to start a new epoch's DataLoader are run again."""
        dt, cold, _ = self.step()
        while cold:
            dt, cold, _ = self.step()
        self.cpu.append(self.last_cpu)
        return dt




class BatchSide:
    """Fetching batches alone (no model) from `loader(epoch)`, one batch a call, across epochs: seconds per call;
    `.cpu` collects this process's CPU seconds per call (use workers=0 so all the loading is in this process; it
    runs with one intra-op thread, as a DataLoader worker does)."""

    def __init__(self, loader: Callable[[int], Any]):
        self.loader, self.epoch, self.it = loader, 0, None
        self.cpu: list[float] = []
        self.samples = 0

    def __call__(self) -> float:
        while True:
            if self.it is None:
                self.it = iter(self.loader(self.epoch))
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                with torch_threads(1):  # as in a DataLoader worker
                    batch = next(self.it)
            except StopIteration:
                self.it, self.epoch = None, self.epoch + 1
                continue
            dt = time.perf_counter() - t0
            self.cpu.append(time.process_time() - c0)
            self.samples = int(batch["x"].shape[0])
            return dt
