"""Students: the fd-vit table (timm Beit settings) and any timm ViT, built at random init with the plain-timm recipe
that rebuilds them."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

import timm

from fdpipe.errors import FdpipeError

from ..jsonable import json_able
from .helpers import first_line

# FD students: a timm Beit with a shared relative position bias, no absolute position embedding, layer scale 0.1 and
# q/v bias. Drop path (linear over depth) is FD's pretraining rate: 0.2 base, 0.3 large, 0.1 (DeiT's) below (distill's
# recipe, fdpipe/distill/recipe.py, passes the same).
STUDENTS: dict[str, dict[str, Any]] = {
    "fd-vit-tiny": dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "fd-vit-small": dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
    "fd-vit-base": dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.2),
    "fd-vit-large": dict(embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.3),
}

# The timm entry point an fd-vit student is built through; model_args override all of its settings. timm registers
# Beit only at base and large, so large (1024 wide, 24 deep, 16 heads, as beit_large) names beit_large and the
# smaller sizes the nearest, beit_base; config.json's pretrained_cfg "tag" then names the student (fd_vit_tiny).
BEIT_ARCH = "beit_base_patch16_224"
BEIT_ARCHS = {"fd-vit-large": "beit_large_patch16_224"}

_BEIT_STUDENT_ARGS: dict[str, Any] = dict(
    mlp_ratio=4.0,
    use_abs_pos_emb=False,
    use_rel_pos_bias=False,
    use_shared_rel_pos_bias=True,
    init_values=0.1,
    qkv_bias=True,
    num_classes=0,
    # forward_features must end in the final LayerNorm (FD projects the normed tokens); Beit's default 'avg' pool
    # would move that norm to fc_norm after pooling. Fine-tuning switches to use_fc_norm=True with a new head.
    global_pool="avg",
    use_fc_norm=False,
)


# The largest model fdpipe builds from model_args (a config.json's, or a student's settings): a ViT-G/14 has 1.8
# billion parameters, and 4 billion are 16 GB of float32 weights before the optimizer's state; and the largest patch
# grid, 128 x 128 tokens (1024 px at /8), past which one attention map of one image is a gigabyte.
MAX_PARAMS, MAX_GRID = 4 * 10**9, 128


def _positive(args: Mapping[str, Any], key: str, default: float) -> float:
    """args[key] when it is a positive number (the largest side of an [h, w] pair), else timm's default: a value of
    another kind is left for timm to refuse."""
    v = args.get(key, default)
    v = max(v, default=0) if isinstance(v, (list, tuple)) and all(isinstance(x, (int, float)) for x in v) else v
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf") else default


def check_model_size(args: Mapping[str, Any], what: str) -> None:
    """Refuse ViT model_args that ask for a model too large to build, in one line before timm allocates it: a
    tampered config.json (embed_dim 60000 and depth 40 are 1.7e12 parameters, which timm would start to allocate)
    or a student of 4096 px in 1-px patches. The count is a ViT's: blocks of (4 + 2 x mlp_ratio) x dim^2, the patch
    embedding, the position table and the head, from timm's defaults where args leave a value out."""
    dim, depth = _positive(args, "embed_dim", 768), _positive(args, "depth", 12)
    patch, size = _positive(args, "patch_size", 16), _positive(args, "img_size", 224)
    grid = int(size // patch)
    params = (depth * (4 + 2 * _positive(args, "mlp_ratio", 4.0)) * dim**2 + 3 * patch**2 * dim + grid**2 * dim
              + dim * _positive(args, "num_classes", 1000))
    if params > MAX_PARAMS:
        raise FdpipeError(f"{what} asks for a model of {params:.2g} parameters (embed_dim {dim:g}, depth {depth:g}), "
                          f"more than the {MAX_PARAMS / 1e9:g} billion fdpipe builds; check its model_args")
    if grid > MAX_GRID:
        raise FdpipeError(f"{what} asks for a {grid}x{grid} patch grid (img_size {size:g}, patch_size {patch:g}), "
                          f"more than the {MAX_GRID}x{MAX_GRID} fdpipe builds; use larger patches or a smaller "
                          "image size")


@dataclass(frozen=True)
class StudentSpec:
    """How to rebuild a student with plain timm: timm.create_model(architecture, **model_args)."""

    name: str  # an alias from STUDENTS or the timm name
    architecture: str
    model_args: dict[str, Any] = field(hash=False)

    @property
    def image_size(self) -> int | None:
        s = self.model_args.get("img_size")
        return int(s[0] if isinstance(s, (list, tuple)) else s) if s is not None else None

    def to_dict(self) -> dict[str, Any]:
        return json_able(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StudentSpec:
        return cls(name=str(d["name"]), architecture=str(d["architecture"]), model_args=dict(d["model_args"]))


def _student_error(name: str) -> FdpipeError:
    return FdpipeError(f"unknown student '{name}': use one of {', '.join(STUDENTS)} or any timm ViT name "
                       f"(e.g. vit_small_patch16_224)")


def create_student(name: str, *, image_size: int, patch_size: int | None = None,
                   drop_path: float | None = None) -> tuple[nn.Module, StudentSpec]:
    """A randomly initialized student and the plain-timm recipe that rebuilds it.

    patch_size: 16 for fd-vit-* when None; for other timm ViTs None keeps the model's own.
    drop_path: None takes the table's default (0.1, 0.2 base, 0.3 large; 0.1 for other timm ViTs).
    """
    if image_size <= 0:
        raise FdpipeError(f"student image size must be positive, got {image_size}")
    if name in STUDENTS:
        row = dict(STUDENTS[name])
        p = 16 if patch_size is None else int(patch_size)
        dp = row.pop("drop_path_rate")
        dp = dp if drop_path is None else float(drop_path)
        args = dict(_BEIT_STUDENT_ARGS, **row, img_size=int(image_size), patch_size=p, drop_path_rate=dp)
        arch = BEIT_ARCHS.get(name, BEIT_ARCH)
    else:
        arch_name, _ = timm.models.split_model_name_tag(name)
        if not timm.is_model(arch_name):
            raise _student_error(name)
        arch = arch_name
        args = dict(img_size=int(image_size), drop_path_rate=0.1 if drop_path is None else float(drop_path),
                    num_classes=0)
        if patch_size is not None:
            args["patch_size"] = int(patch_size)
    p = args.get("patch_size")
    if p is not None and image_size % p:
        raise FdpipeError(f"student image size {image_size} is not a multiple of the patch size {p}; "
                          f"pick a multiple (e.g. {image_size // p * p or p})")
    check_model_size(args, f"student {name}")
    try:
        model = timm.create_model(arch, pretrained=False, **args)
    except TypeError as e:
        raise FdpipeError(f"'{name}' is not a timm ViT ({first_line(e)}); students must be ViTs: use one of "
                          f"{', '.join(STUDENTS)} or a timm ViT name") from None
    if getattr(model, "patch_embed", None) is None:
        raise FdpipeError(f"'{name}' is not a timm ViT (no patch_embed); use one of {', '.join(STUDENTS)} "
                          f"or a timm ViT name")
    return model, StudentSpec(name=name, architecture=arch, model_args=args)


def student_grid(model: nn.Module) -> tuple[int, int]:
    """(h, w) of a ViT's patch tokens at its configured input size."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "grid_size", None) is None:
        raise FdpipeError(f"{type(model).__name__} has no patch grid; students must be ViTs")
    return int(pe.grid_size[0]), int(pe.grid_size[1])


def num_prefix_tokens(model: nn.Module) -> int:
    """CLS/register/distillation tokens that come before the patch tokens (0 for CNNs)."""
    return int(getattr(model, "num_prefix_tokens", 0) or 0)


def matching_image_size(teacher_grid: tuple[int, int] | list[int] | int, patch_size: int) -> int:
    """Student input size whose patch grid equals the teacher's (a 16x16 grid with /16 patches -> 256)."""
    g = (teacher_grid, teacher_grid) if isinstance(teacher_grid, int) else tuple(int(v) for v in teacher_grid)
    if len(g) != 2 or g[0] != g[1] or g[0] <= 0:
        raise FdpipeError(f"teacher grid {g} is not square; students take square inputs, so resample the tokens "
                          f"to the teacher grid instead")
    return g[0] * int(patch_size)
