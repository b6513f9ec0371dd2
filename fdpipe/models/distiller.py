"""The student as it is distilled: a timm ViT, its final norm, then a 1x1 projection to the teacher's channels.
It lives below the stages: distill trains it, analyze and finetune load the runs it leaves.

Grid matching follows DESIGN.md: grids must match unless resampling is asked for (bilinear over the patch tokens).

Prefix tokens are paired from the first, in timm's order (CLS, then registers, then a distillation token), as far as
both models have them: CLS is trained against CLS. The rest are left out of the loss. A register teacher's registers
past the student's prefix count stay in the store but are never trained against (DINOv2 with 4 registers and a
1-prefix student: only CLS; a student with CLS + 4 registers learns r1..r4 too). A student's prefix tokens past the
teacher's get no target and learn only through attention. A teacher without prefix tokens (CNNs, SigLIP) leaves the
student's CLS out of the loss.

One teacher is a mapping of one. `Distiller(student, {teacher: info})` (anything with `channels`, `grid` and
`num_prefix_tokens`, such as a `TeacherInfo`, or a (channels, grid, prefix) tuple) makes one head per teacher in the
mapping's order (the order they are drawn from the RNG), runs one student forward, then each teacher's own prefix
match, grid resample and 1x1 projection, and returns {teacher: predictions}; `weighted_fd_loss` is the weighted sum
of the teachers' FD losses. `Distiller(student, channels, grid, prefix)` is that mapping of one, unwrapped at the
edge: `.projector`, `.keep_prefix`, `.teacher_grid`, `forward` and `align_target` take and give the one teacher's
value instead of {teacher: value}. Both forms run the same code; with weight 1.0 the one teacher's loss is fd_loss's
bit for bit (x * 1.0 is exact).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

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


ONE = "teacher"  # the key of the one teacher of `Distiller(student, channels, grid, prefix)`


def head_shape(teacher: Any) -> tuple[int, tuple[int, int], int]:
    """(channels, grid, prefix tokens) of a teacher: a TeacherInfo-like object or a (channels, grid, prefix) tuple."""
    if hasattr(teacher, "channels"):
        return int(teacher.channels), tuple(int(g) for g in teacher.grid), int(teacher.num_prefix_tokens)
    channels, grid, prefix = teacher
    return int(channels), tuple(int(g) for g in grid), int(prefix)


class Distiller(nn.Module):
    """student tokens -> per teacher (prefix match, grid resample, Linear(C_s, C_t)) -> predictions shaped like its
    targets: {teacher: predictions}, or the one teacher's for the 4-argument form.

    `projectors[name]` is each teacher's Linear (`projector` the one teacher's); the heads are made (and drawn from
    the RNG) in the teachers' order.
    """

    def __init__(self, student: nn.Module, teachers: int | Mapping[str, Any], teacher_grid: Sequence[int] | None = None,
                 teacher_prefix: int | None = None):
        super().__init__()
        self.single = not isinstance(teachers, Mapping)
        named = {ONE: (teachers, teacher_grid, teacher_prefix)} if self.single else teachers
        if not named:
            raise ValueError("Distiller needs at least one teacher")
        self.student = student
        self.grid = student_grid(student)
        self.student_prefix = num_prefix_tokens(student)
        self.shapes = {n: head_shape(t) for n, t in named.items()}
        self.names = list(self.shapes)
        self.projectors = nn.ModuleDict({n: nn.Linear(student.num_features, c) for n, (c, _, _) in self.shapes.items()})
        self.teacher_grids = {n: g for n, (_, g, _) in self.shapes.items()}
        self.teacher_prefixes = {n: p for n, (_, _, p) in self.shapes.items()}
        self.keep_prefixes = {n: min(self.student_prefix, p) for n, p in self.teacher_prefixes.items()}
        self._register_load_state_dict_pre_hook(self._one_head_as_saved_before)

    def _one_head_as_saved_before(self, state: dict[str, Any], prefix: str, *args: Any) -> None:
        """A one-teacher state saved before the heads were a mapping names its head `projector.*`: it loads into
        the one head (a run resumed across the change continues)."""
        if len(self.names) == 1:
            for key in [k for k in state if k.startswith(f"{prefix}projector.")]:
                state[f"{prefix}projectors.{self.names[0]}.{key[len(prefix) + len('projector.'):]}"] = state.pop(key)

    def edge(self, named: dict[str, Any]) -> Any:
        """{teacher: value} as the caller made the Distiller: the value itself for the 4-argument form."""
        return named[ONE] if self.single else named

    @property
    def projector(self) -> Any:
        return self.edge(dict(self.projectors))

    @property
    def keep_prefix(self) -> Any:
        return self.edge(self.keep_prefixes)

    @property
    def teacher_grid(self) -> Any:
        return self.edge(self.teacher_grids)

    @property
    def teacher_prefix(self) -> Any:
        return self.edge(self.teacher_prefixes)

    def align_target(self, target: torch.Tensor | Mapping[str, torch.Tensor]) -> Any:
        """The teacher tokens the student is trained against: each teacher's first keep_prefix prefix tokens, then
        its grid."""
        named = {ONE: target} if self.single else target
        return self.edge({n: _align_target(named[n], self.keep_prefixes[n], self.teacher_prefixes[n])
                          for n in self.names})

    def tokens(self, x: torch.Tensor) -> Any:
        """Student tokens after its final norm, laid out like each teacher's: prefix first, then the teacher grid
        (one student forward for all)."""
        y = self.student.forward_features(x)
        return self.edge({n: _layout(y, self.student_prefix, self.keep_prefixes[n], self.grid, self.teacher_grids[n])
                          for n in self.names})

    def forward(self, x: torch.Tensor) -> Any:
        tokens = self.tokens(x)
        named = {ONE: tokens} if self.single else tokens
        return self.edge({n: self.projectors[n](t) for n, t in named.items()})


def weighted_fd_loss(pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                     weights: Mapping[str, float] | None = None, beta: float = 2.0
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The weighted sum of the teachers' FD losses (weights 1 by default) and each teacher's own loss; for one
    teacher of weight 1.0 the total is its fd_loss bit for bit."""
    parts = {n: fd_loss(pred[n], target[n], beta) for n in pred}
    total = None
    for n, loss in parts.items():
        term = loss * (1.0 if weights is None else float(weights[n]))
        total = term if total is None else total + term
    return total, parts


def fd_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Smooth L1 with beta 2.0, mean over B*T*C (FD)."""
    return F.smooth_l1_loss(pred.float(), target.float(), beta=beta)
