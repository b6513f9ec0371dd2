"""The student as it is distilled: a timm ViT, its final norm, then a 1x1 projection to the teacher's channels.
It lives below the stages: distill trains it, analyze and finetune load the runs it leaves.

Grid matching follows DESIGN.md: grids must match unless resampling is asked for (bilinear over the patch tokens).

Prefix tokens are paired from the first, in timm's order (CLS, then registers, then a distillation token), as far as
both models have them: CLS is trained against CLS. The rest are left out of the loss. A register teacher's registers
past the student's prefix count stay in the store but are never trained against (DINOv2 with 4 registers and a
1-prefix student: only CLS; a student with CLS + 4 registers learns r1..r4 too). A student's prefix tokens past the
teacher's get no target and learn only through attention. A teacher without prefix tokens (CNNs, SigLIP) leaves the
student's CLS out of the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FdpipeError
from .students import matching_image_size, num_prefix_tokens, student_grid


def check_grid(student: nn.Module, teacher_grid: tuple[int, int], resample: bool, patch_size: int) -> None:
    grid = student_grid(student)
    if tuple(grid) != tuple(teacher_grid) and not resample:
        try:
            hint = f"--image-size {matching_image_size(teacher_grid, patch_size)}"
        except FdpipeError:
            hint = "a student input size that matches"
        raise FdpipeError(
            f"student grid {grid[0]}x{grid[1]} does not match the teacher grid {teacher_grid[0]}x{teacher_grid[1]}; "
            f"use {hint} (patch {patch_size}), or --resample-grid to resample the student's tokens"
        )


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
        if target.ndim != 3 or self.keep_prefix == self.teacher_prefix:
            return target
        if self.keep_prefix == 0:
            return target[:, self.teacher_prefix:]
        return torch.cat([target[:, : self.keep_prefix], target[:, self.teacher_prefix:]], dim=1)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Student tokens after its final norm, laid out like the teacher's: prefix first, then the teacher grid."""
        y = self.student.forward_features(x)
        prefix, patches = y[:, : self.student_prefix], y[:, self.student_prefix:]
        if self.grid != self.teacher_grid:
            b, n, c = patches.shape
            patches = patches.transpose(1, 2).reshape(b, c, *self.grid)
            patches = F.interpolate(patches, size=self.teacher_grid, mode="bilinear", align_corners=False)
            patches = patches.flatten(2).transpose(1, 2)
        return torch.cat([prefix[:, : self.keep_prefix], patches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tokens(x))


def fd_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Smooth L1 with beta 2.0, mean over B*T*C (FD)."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
