"""The student as it is distilled: a timm ViT, its final norm, then a 1x1 projection to the teacher's channels.
It lives below the stages: distill trains it, analyze and finetune load the runs it leaves.

Grid matching follows DESIGN.md: grids must match unless resampling is asked for (bilinear over the patch tokens).

Prefix tokens are paired from the first, in timm's order (CLS, then registers, then a distillation token), as far as
both models have them: CLS is trained against CLS. The rest are left out of the loss. A register teacher's registers
past the student's prefix count stay in the store but are never trained against (DINOv2 with 4 registers and a
1-prefix student: only CLS; a student with CLS + 4 registers learns r1..r4 too). A student's prefix tokens past the
teacher's get no target and learn only through attention. A teacher without prefix tokens (CNNs, SigLIP) leaves the
student's CLS out of the loss.

Several teachers (`MultiDistiller`): one student forward, then each teacher's own prefix match, grid resample and
1x1 projection; the loss is the weighted sum of the teachers' FD losses (`multi_fd_loss`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FdpipeError
from .students import matching_image_size, num_prefix_tokens, student_grid


def check_grid(student: nn.Module, teacher_grid: tuple[int, int], resample: bool, patch_size: int,
               teacher: str | None = None) -> None:
    """Refuse a student grid that differs from the teacher's unless resampling is asked for; `teacher` names it
    (several teachers)."""
    grid = student_grid(student)
    if tuple(grid) != tuple(teacher_grid) and not resample:
        try:
            hint = f"--image-size {matching_image_size(teacher_grid, patch_size)}"
        except FdpipeError:
            hint = "a student input size that matches"
        raise FdpipeError(
            f"student grid {grid[0]}x{grid[1]} does not match the teacher grid {teacher_grid[0]}x{teacher_grid[1]}"
            f"{f' of {teacher}' if teacher else ''}; "
            f"use {hint} (patch {patch_size}), or --resample-grid to resample the student's tokens"
        )


def _align_target(target: torch.Tensor, keep_prefix: int, teacher_prefix: int) -> torch.Tensor:
    if target.ndim != 3 or keep_prefix == teacher_prefix:
        return target
    if keep_prefix == 0:
        return target[:, teacher_prefix:]
    return torch.cat([target[:, :keep_prefix], target[:, teacher_prefix:]], dim=1)


def _layout(y: torch.Tensor, student_prefix: int, keep_prefix: int, grid: tuple[int, int],
            teacher_grid: tuple[int, int]) -> torch.Tensor:
    prefix, patches = y[:, :student_prefix], y[:, student_prefix:]
    if grid != teacher_grid:
        b, n, c = patches.shape
        patches = patches.transpose(1, 2).reshape(b, c, *grid)
        patches = F.interpolate(patches, size=teacher_grid, mode="bilinear", align_corners=False)
        patches = patches.flatten(2).transpose(1, 2)
    return torch.cat([prefix[:, :keep_prefix], patches], dim=1)


class Distiller(nn.Module):
    """student tokens -> (prefix match, grid resample) -> Linear(C_s, C_t): predictions shaped like the targets."""

    def __init__(self, student: nn.Module, teacher_channels: int, teacher_grid: tuple[int, int],
                 teacher_prefix: int):
        super().__init__()
        self.student = student
        self.projector = nn.Linear(student.num_features, teacher_channels)
        self.grid = student_grid(student)
        self.teacher_grid = tuple(int(g) for g in teacher_grid)
        self.student_prefix = num_prefix_tokens(student)
        self.teacher_prefix = int(teacher_prefix)
        self.keep_prefix = min(self.student_prefix, self.teacher_prefix)

    def align_target(self, target: torch.Tensor) -> torch.Tensor:
        """The teacher tokens the student is trained against: its first keep_prefix prefix tokens, then the grid."""
        return _align_target(target, self.keep_prefix, self.teacher_prefix)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Student tokens after its final norm, laid out like the teacher's: prefix first, then the teacher grid."""
        return _layout(self.student.forward_features(x), self.student_prefix, self.keep_prefix, self.grid,
                       self.teacher_grid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tokens(x))


@dataclass(frozen=True)
class TeacherShape:
    """What a teacher's targets look like: channels, patch grid and prefix-token count."""

    channels: int
    grid: tuple[int, int]
    prefix: int


class MultiDistiller(nn.Module):
    """One student, a projection head per teacher: student tokens -> per teacher (prefix match, grid resample,
    Linear(C_s, C_t)) -> {teacher: predictions shaped like its targets}.

    `projectors[name]` is each teacher's Linear, as `Distiller.projector` is the one teacher's; the heads are made
    (and drawn from the RNG) in the teachers' order.
    """

    def __init__(self, student: nn.Module, teachers: Mapping[str, TeacherShape | Sequence]):
        super().__init__()
        self.student = student
        self.grid = student_grid(student)
        self.student_prefix = num_prefix_tokens(student)
        self.teachers = {n: t if isinstance(t, TeacherShape) else TeacherShape(int(t[0]), tuple(t[1]), int(t[2]))
                         for n, t in teachers.items()}
        if not self.teachers:
            raise ValueError("MultiDistiller needs at least one teacher")
        self.projectors = nn.ModuleDict({n: nn.Linear(student.num_features, t.channels)
                                         for n, t in self.teachers.items()})
        self.names = list(self.teachers)
        self.teacher_grid = {n: tuple(int(g) for g in t.grid) for n, t in self.teachers.items()}
        self.keep_prefix = {n: min(self.student_prefix, int(t.prefix)) for n, t in self.teachers.items()}

    def align_target(self, target: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each teacher's tokens the student is trained against (see `Distiller.align_target`)."""
        return {n: _align_target(target[n], self.keep_prefix[n], int(self.teachers[n].prefix)) for n in self.names}

    def tokens(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Student tokens after its final norm, laid out like each teacher's (one student forward for all)."""
        y = self.student.forward_features(x)
        return {n: _layout(y, self.student_prefix, self.keep_prefix[n], self.grid, self.teacher_grid[n])
                for n in self.names}

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: self.projectors[n](t) for n, t in self.tokens(x).items()}


def multi_fd_loss(pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                  weights: Mapping[str, float] | None = None, beta: float = 2.0
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the teachers' FD losses (weights 1 by default) and each teacher's own loss."""
    parts = {n: fd_loss(pred[n], target[n], beta) for n in pred}
    total = None
    for n, loss in parts.items():
        term = loss * (1.0 if weights is None else float(weights[n]))
        total = term if total is None else total + term
    return total, parts


def fd_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Smooth L1 with beta 2.0, mean over B*T*C (FD)."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
