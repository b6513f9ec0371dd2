"""The student as it is distilled: a timm ViT, its final norm, then a 1x1 projection to the teacher's channels.
It lives below the stages: distill trains it, analyze and finetune load the runs it leaves.

Grid matching follows DESIGN.md: grids must match unless resampling is asked for (bilinear over the patch tokens);
prefix tokens are matched when both sides have them and dropped otherwise.
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
        """Drop the teacher's prefix tokens the student cannot match (e.g. a ViT teacher, a prefix-free student)."""
        return target[:, self.teacher_prefix - self.keep_prefix:] if target.ndim == 3 else target

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Student tokens after its final norm, laid out like the teacher's: prefix first, then the teacher grid."""
        y = self.student.forward_features(x)
        prefix, patches = y[:, : self.student_prefix], y[:, self.student_prefix:]
        if self.grid != self.teacher_grid:
            b, n, c = patches.shape
            patches = patches.transpose(1, 2).reshape(b, c, *self.grid)
            patches = F.interpolate(patches, size=self.teacher_grid, mode="bilinear", align_corners=False)
            patches = patches.flatten(2).transpose(1, 2)
        return torch.cat([prefix[:, self.student_prefix - self.keep_prefix:], patches], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tokens(x))


def fd_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Smooth L1 with beta 2.0, mean over B*T*C (FD)."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
