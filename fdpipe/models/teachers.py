"""Teachers: the alias table, a frozen timm model with the extraction rule (whitened tokens or logits), and its
description for the store manifest."""

from __future__ import annotations

import contextlib
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import timm
import timm.data

from fdpipe.errors import FdpipeError

from ..store.contract import TeacherInfo
from ..jsonable import json_able
from .weights import load_pretrained

# alias -> timm name. The input contract (size, mean/std, bicubic everywhere) is the weights' pretrained_cfg, except
# for the size where TEACHER_IMAGE_SIZES says otherwise; each comment gives it and the targets it makes: prefix tokens
# + patch grid, x C. CLIP = OpenAI's mean/std, IN = ImageNet's, 0.5 = mean = std = 0.5.
# Each architecture runs the activation its weights were trained with (docs/recipe.md, "CLIP activation"): OpenAI's
# CLIP was trained with QuickGELU, as FD's models/clip/model.py runs it, so the clip aliases are timm's quickgelu
# variants over the same weights file as timm's GELU vit_*_clip_224.openai (earlier fdpipe's clip aliases: their
# stores record that name and hold GELU targets).
TEACHERS: dict[str, str] = {
    "clip-l": "vit_large_patch14_clip_quickgelu_224.openai",  # 224 px, CLIP: CLS + 16x16, C 1024
    "clip-b": "vit_base_patch16_clip_quickgelu_224.openai",  # 224 px, CLIP: CLS + 14x14, C 768
    "dino-b": "vit_base_patch16_224.dino",  # 224 px, IN: CLS + 14x14, C 768
    "deit-b": "deit_base_patch16_224.fb_in1k",  # 224 px, IN: CLS + 14x14, C 768; 1000-class head for logits
    "effnet-lite0": "tf_efficientnet_lite0",  # 224 px, 0.5: 7x7 feature map, no prefix, C 1280
    "effnet-lite2": "tf_efficientnet_lite2",  # 260 px, 0.5: 9x9 feature map ('same' padding), no prefix, C 1280
    "dinov2-b": "vit_base_patch14_dinov2.lvd142m",  # 224 px (cfg 518), IN: CLS + 16x16, C 768
    "dinov2-b-reg": "vit_base_patch14_reg4_dinov2.lvd142m",  # 224 px (cfg 518), IN: CLS, 4 registers + 16x16, C 768
    "dinov2-l": "vit_large_patch14_dinov2.lvd142m",  # 224 px (cfg 518), IN: CLS + 16x16, C 1024
    "dinov2-l-reg": "vit_large_patch14_reg4_dinov2.lvd142m",  # 224 px (cfg 518), IN: CLS, 4 registers + 16x16, C 1024
    "siglip-b": "vit_base_patch16_siglip_224.webli",  # 224 px, 0.5: 14x14, no CLS (attention-pool head), C 768
    "siglip-so400m": "vit_so400m_patch14_siglip_384.webli",  # 384 px, 0.5: 27x27 (the last 6 px unused), no CLS, C 1152
    "eva02-clip-l": "eva02_large_patch14_clip_224.merged2b",  # 224 px, CLIP: CLS + 16x16, C 1024; 768-d projection head
}

# Aliases that run at another size than their pretrained_cfg's. DINOv2's says 518 (its short high-resolution last
# phase): a 37x37 grid, T 1370 (5.3x the store of 224) and a 592 px /16 student. FD runs teachers at 224, where /14
# gives 16x16 (a 256 px /16 student, as clip-l); timm resamples the position table at load. --image-size 518 is native.
TEACHER_IMAGE_SIZES: dict[str, int] = {alias: 224 for alias in ("dinov2-b", "dinov2-b-reg", "dinov2-l", "dinov2-l-reg")}

WHITENING: dict[str, Any] = {"name": "layernorm-noaffine", "eps": 1e-6}

# The teacher's arithmetic. fp32 is FD's (AMP off when it extracts targets); bf16 autocast's targets differ from fp32's
# by more than fdpipe's 0.9999 per-token cosine (docs/recipe.md, "Teacher precision"), so it is opt-in.
PRECISIONS = ("fp32", "bf16")


def whiten(x: torch.Tensor) -> torch.Tensor:
    """Per-token LayerNorm over C with no affine, in float32: stored targets are ~N(0, 1) per token."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=WHITENING["eps"])


def resolve_teacher_name(name: str) -> str:
    """Alias -> timm name; any timm name passes through; anything else is a user error naming the aliases."""
    if name in TEACHERS:
        return TEACHERS[name]
    if name.startswith(("hf-hub:", "local-dir:")):
        return name
    if timm.is_model(name):
        arch, tag = timm.models.split_model_name_tag(name)
        if tag:
            try:
                timm.models.get_pretrained_cfg(name, allow_unregistered=False)
            except RuntimeError:
                tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
                raise FdpipeError(f"unknown weights tag '{tag}' for {arch}: use one of {', '.join(tags) or '(none)'}"
                                  ) from None
        return name
    raise FdpipeError(f"unknown teacher '{name}': use one of {', '.join(TEACHERS)} or any timm model name "
                      f"(see timm.list_models())")


_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "num_classes")


class Teacher(nn.Module):
    """A frozen timm model plus the extraction rule: whitened tokens (or logits) of already-normalized images.

    Always in eval mode (no dropout, no drop path) with requires_grad False; channels_last everywhere (it doubles a
    CNN teacher's CPU speed through oneDNN, and suits CUDA's tensor cores), float32 unless precision "bf16" asks for
    bf16 autocast (on any device), and always returns float32.
    """

    def __init__(self, model: nn.Module, *, alias: str, timm_name: str, weights_sha256: str, layer: int | None,
                 target: str, image_size: int, device: str | torch.device = "cpu", precision: str = "fp32") -> None:
        super().__init__()
        if precision not in PRECISIONS:
            raise FdpipeError(f"unknown teacher precision '{precision}': use one of {', '.join(PRECISIONS)}")
        self.precision = precision
        self.device = torch.device(device)
        model.eval().requires_grad_(False)
        model = model.to(self.device).to(memory_format=torch.channels_last)
        self.model = model
        self.layer = layer
        self.target = target
        self.image_size = image_size

        cfg = timm.data.resolve_model_data_config(model)
        cfg["input_size"] = (3, image_size, image_size)
        self._data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}

        probe, grid, prefix = self._run(torch.zeros(1, 3, image_size, image_size))
        pcfg = {k: getattr(model, "pretrained_cfg", {}).get(k) for k in _CFG_KEYS}
        if target == "logits":
            tokens, channels = 1, probe.shape[-1]
        else:
            tokens, channels = probe.shape[1], probe.shape[2]
        self._info = TeacherInfo(
            alias=alias, timm_name=timm_name, weights_sha256=weights_sha256, layer=layer, target=target,
            pretrained_cfg=json_able(pcfg), image_size=image_size, tokens=int(tokens), channels=int(channels),
            grid=tuple(int(g) for g in grid), num_prefix_tokens=int(prefix), precision=precision)

    @property
    def info(self) -> TeacherInfo:
        return self._info

    @property
    def data_config(self) -> dict[str, Any]:
        """timm data config (input_size, mean, std, interpolation, crop_pct, crop_mode) at the run image size."""
        return dict(self._data_config)

    def train(self, mode: bool = True) -> Teacher:
        """A teacher never trains: train() keeps eval mode so no drop path or dropout sneaks in."""
        return super().train(False)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _run(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int], int]:
        """Un-whitened tokens [B, T, C] (or logits [B, K]), with the grid and the prefix-token count."""
        x = x.to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        m = self.model
        with self._autocast():
            if self.target == "logits":
                return m(x).float(), (0, 0), 0
            if self.layer is None:
                y = m.forward_features(x)
            else:
                y = self._intermediate(x)
        if y.ndim == 4:  # CNN feature map -> tokens, no prefix
            if getattr(m, "output_fmt", "NCHW") == "NHWC":
                y = y.permute(0, 3, 1, 2)
            grid = (int(y.shape[2]), int(y.shape[3]))
            return y.flatten(2).transpose(1, 2), grid, 0
        if y.ndim != 3:
            raise FdpipeError(f"teacher {self._info_name()} gives features of shape {tuple(y.shape)}; "
                              f"pick a model whose forward_features returns tokens or a feature map")
        prefix = int(getattr(m, "num_prefix_tokens", 0) or 0)
        n = y.shape[1] - prefix
        pe = getattr(m, "patch_embed", None)
        if pe is not None and hasattr(pe, "dynamic_feat_size"):
            grid = tuple(int(g) for g in pe.dynamic_feat_size(tuple(x.shape[-2:])))
        elif pe is not None and getattr(pe, "grid_size", None) is not None:
            grid = tuple(int(g) for g in pe.grid_size)
        else:
            s = math.isqrt(n)
            grid = (s, n // s) if s * s == n else (1, n)
        return y, grid, prefix

    def _info_name(self) -> str:
        return getattr(getattr(self, "_info", None), "timm_name", type(self.model).__name__)

    def _intermediate(self, x: torch.Tensor) -> torch.Tensor:
        """Output of block K without the final norm (that norm's affine belongs to the last block); prefix first."""
        m = self.model
        if not hasattr(m, "forward_intermediates"):
            raise FdpipeError(f"teacher {self._info_name()} has no forward_intermediates; drop --layer")
        try:  # ViT family: tokens, with the prefix tokens returned beside the patch tokens
            out = m.forward_intermediates(x, indices=[self.layer], return_prefix_tokens=True, norm=False,
                                          output_fmt="NLC", intermediates_only=True)
        except TypeError:  # CNNs: NCHW stage outputs
            out = m.forward_intermediates(x, indices=[self.layer], intermediates_only=True)
        y = out[0]
        if isinstance(y, tuple):  # (patch tokens, prefix tokens)
            y = torch.cat([y[1], y[0]], dim=1)
        return y

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, H, W] normalized with data_config -> whitened targets [B, T, C] float32 (or logits [B, K])."""
        if x.ndim != 4 or tuple(x.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"teacher expects [B, 3, {self.image_size}, {self.image_size}] inputs, "
                             f"got {tuple(x.shape)}")
        y, _, _ = self._run(x)
        if self.target == "logits":
            return y.float()
        return whiten(y)


def _num_layers(model: nn.Module) -> int:
    if hasattr(model, "feature_info") and not callable(model.feature_info):
        try:
            return len(model.feature_info)
        except TypeError:
            pass
    if hasattr(model, "blocks"):
        return len(model.blocks)
    raise FdpipeError(f"cannot count the layers of {type(model).__name__}; drop --layer")


def create_teacher(name: str, *, weights: str | os.PathLike | None = None, image_size: int | None = None,
                   layer: int | None = None, target: str = "features",
                   device: str | torch.device = "cpu", precision: str = "fp32") -> Teacher:
    """Build a frozen teacher from an alias or timm name, finding its weights (see fdpipe.models.weights).

    image_size None: the alias's size in TEACHER_IMAGE_SIZES, else the weights' pretrained_cfg input size.
    precision: one of PRECISIONS (fp32, FD's, unless bf16 autocast is asked for).
    """
    if target not in ("features", "logits"):
        raise FdpipeError(f"unknown target '{target}': use 'features' or 'logits'")
    if target == "logits" and layer is not None:
        raise FdpipeError("--layer picks a feature block; drop it for target 'logits'")
    if image_size is not None and image_size <= 0:
        raise FdpipeError(f"image size must be positive, got {image_size}")
    timm_name = resolve_teacher_name(name)
    if image_size is None:
        image_size = TEACHER_IMAGE_SIZES.get(name)
    model, sha = load_pretrained(name, timm_name, weights, image_size, what="teacher")
    if target == "logits" and getattr(model, "num_classes", 0) == 0:
        raise FdpipeError(f"teacher '{name}' has no classifier head; target 'logits' needs one (e.g. deit-b)")

    if image_size is None:
        size = timm.data.resolve_model_data_config(model)["input_size"]
        if size[-1] != size[-2]:
            raise FdpipeError(f"teacher '{name}' has a non-square input {tuple(size[1:])}; pass an image size")
        image_size = int(size[-1])
    if layer is not None:
        n = _num_layers(model)
        if not -n <= layer < n:
            raise FdpipeError(f"--layer {layer} is out of range for {timm_name}: it has {n} layers (0..{n - 1})")
        layer = layer % n
    return Teacher(model, alias=name, timm_name=timm_name, weights_sha256=sha, layer=layer, target=target,
                   image_size=image_size, device=device, precision=precision)
