"""Where the fine-tuning model starts: a distilled run, random weights (the baseline), or any timm checkpoint.

Whatever the start, the result is a plain timm classifier plus the StudentSpec that rebuilds it with
``timm.create_model(spec.architecture, **spec.model_args)``, so the saved checkpoint loads without fdpipe.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
from torch import nn

from ..errors import FdpipeError
from ..models import BEIT_ARCH, StudentSpec, check_model_size, create_student, load_model
from ..models.checkpoint import check_config, config_args_checked, load_weights
from .model import classifier_from_distilled

# What every fine-tuned FD student is: per-block relative position bias, mean pooling + fc_norm, a K-way head.
_CLASSIFIER_ARGS = dict(use_rel_pos_bias=True, use_shared_rel_pos_bias=False, global_pool="avg", use_fc_norm=True)


@dataclass(frozen=True)
class Init:
    """The model to fine-tune and what it came from."""

    model: nn.Module
    spec: StudentSpec
    kind: str  # "distilled", "scratch" or "checkpoint"
    source: str
    image_size: int | None


def _read_config(directory: Path) -> dict[str, Any] | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FdpipeError(f"{path} is not valid JSON ({e}); point --init at a run directory written by fdpipe") from None
    if not isinstance(config, dict) or "architecture" not in config:
        raise FdpipeError(f"{path} names no 'architecture'; point --init at a run directory or timm checkpoint")
    check_config(config, path)
    return config


def _weights_file(path: Path, config: dict[str, Any]) -> Path:
    """The checkpoint's weights: the file given, the config's 'weights', or a timm/HF dir's model.safetensors."""
    if path.is_file():
        return path
    names = [config["weights"]] if config.get("weights") else []
    names += ["model.safetensors", "student.safetensors", "pytorch_model.bin"]
    for name in names:
        if (path / name).is_file():
            return path / name
    raise FdpipeError(f"--init {path}: config.json is there but no weights ({', '.join(names)}); "
                      "the run may not have finished saving")


def _is_shared_bias_student(config: dict[str, Any]) -> bool:
    args = config.get("model_args") or {}
    return config["architecture"].startswith("beit") and bool(args.get("use_shared_rel_pos_bias"))


def _image_size_of(args: dict[str, Any]) -> int | None:
    s = args.get("img_size")
    return int(s[0] if isinstance(s, (list, tuple)) else s) if s is not None else None


def _check_head(head_classes: int, num_classes: int, new_head: bool, what: str) -> None:
    if head_classes and head_classes != num_classes and not new_head:
        raise FdpipeError(f"{what} has a {head_classes}-class head but the data has {num_classes} classes; "
                          "pass --new-head to replace the head, or fine-tune on data with the same classes")


def from_distilled(weights: Path, config: dict[str, Any], num_classes: int, drop_path: float,
                   image_size: int | None) -> Init:
    """FD student -> classifier: per-block tables copied from the shared one, mean pool, a fresh fc_norm, new head.

    fc_norm starts at ones/zeros, as in FD (its fine-tuning ViT has norm = Identity and a new fc_norm, so the
    student's final norm is not loaded) and BEiT/MAE; every block's weights are the student's.
    """
    saved = dict(config.get("model_args") or {})
    args = {**saved, **({} if image_size is None else {"img_size": image_size})}
    check_model_size(args, str(weights.parent / "config.json"))
    sd = load_weights(weights)
    with config_args_checked(weights.parent / "config.json", saved, config["architecture"]):
        model = classifier_from_distilled(sd, args, num_classes, drop_path=drop_path, arch=config["architecture"])
    spec_args = {k: v for k, v in args.items() if k not in ("pretrained", "arch", "model_name")}
    spec_args.update(_CLASSIFIER_ARGS, num_classes=num_classes, drop_path_rate=drop_path)
    spec = StudentSpec(name=str(config.get("name", config["architecture"])), architecture=config["architecture"],
                       model_args=spec_args)
    return Init(model, spec, "distilled", str(weights), _image_size_of(spec_args))


def scratch(num_classes: int, drop_path: float, student: str, image_size: int | None, patch_size: int | None,
            like: str | None) -> Init:
    """Random weights, the same architecture as a distilled run would have: the baseline FD is compared with."""
    if like is not None:
        p = Path(like).expanduser()
        config = _read_config(p if p.is_dir() else p.parent) if p.exists() else None
        if config is None:
            raise FdpipeError(f"--like {like}: no config.json there; point at a distilled run directory")
        arch, args = config["architecture"], dict(config.get("model_args") or {})
        if image_size is not None:
            args["img_size"] = image_size
        check_model_size(args, f"--like {like}")
        name = str(config.get("name", arch))
    else:
        _, spec = create_student(student, image_size=image_size or 224, patch_size=patch_size, drop_path=drop_path)
        arch, args, name = spec.architecture, dict(spec.model_args), spec.name
    args.update(num_classes=num_classes, drop_path_rate=drop_path)
    if arch == BEIT_ARCH or arch.startswith("beit"):
        args.update(_CLASSIFIER_ARGS)
    try:
        model = timm.create_model(arch, pretrained=False, **args)
    except (TypeError, ValueError) as e:
        raise FdpipeError(f"cannot build {arch} with {args} ({e}); check --student/--like") from None
    spec = StudentSpec(name=name, architecture=arch, model_args=args)
    return Init(model, spec, "scratch", "scratch", _image_size_of(args))


def from_checkpoint(init: str, num_classes: int, drop_path: float, image_size: int | None, new_head: bool) -> Init:
    """A timm checkpoint (a model dir with config.json, a weights file beside one) or a timm model name."""
    p = Path(init).expanduser()
    overrides: dict[str, Any] = {"drop_path_rate": drop_path}
    if image_size is not None:
        overrides["img_size"] = image_size
    if p.exists():
        config = _read_config(p if p.is_dir() else p.parent)
        if config is None:
            raise FdpipeError(f"--init {init} is not a run or checkpoint: no config.json there; pass a distilled run "
                              "directory, a timm model directory (config.json + model.safetensors), a timm name, "
                              "or 'scratch'")
        weights = _weights_file(p, config)
        if _is_shared_bias_student(config):
            return from_distilled(weights, config, num_classes, drop_path, image_size)
        head = int(config.get("num_classes", (config.get("model_args") or {}).get("num_classes", 0)) or 0)
        _check_head(head, num_classes, new_head, f"--init {init}")
        model, spec, _ = load_model(weights, num_classes=num_classes, **overrides)
        return Init(model, spec, "checkpoint", str(weights), image_size or _image_size_of(spec.model_args))
    if "/" in init or init.endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise FdpipeError(f"--init {init}: no such file or directory; pass a distilled run, a checkpoint, a timm "
                          "name, or 'scratch'")
    arch, _ = timm.models.split_model_name_tag(init)
    if not timm.is_model(arch):
        raise FdpipeError(f"--init {init} is not a run, a checkpoint or a timm model name; pass a distilled run "
                          "directory, a timm model directory (config.json + model.safetensors), a timm name, or "
                          "'scratch'")
    try:
        cfg = timm.models.get_pretrained_cfg(init)
        head = int(getattr(cfg, "num_classes", 0) or 0) if cfg is not None else 0
    except Exception:  # noqa: BLE001 - an unknown tag is reported by the loader below
        head = 0
    _check_head(head, num_classes, new_head, f"timm model {init}")
    try:
        model, spec, _ = load_model(init, num_classes=num_classes, **overrides)
    except TypeError as e:
        raise FdpipeError(f"--init {init}: {e}; drop --image-size for models without img_size") from None
    except FdpipeError as e:
        if "no weights for" not in str(e):
            raise
        reason = str(e).rsplit("[", 1)[-1].rstrip("]") if "[" in str(e) else "not found"
        raise FdpipeError(f"--init {init}: no pretrained weights for this timm name ({reason}); fill the Hugging Face "
                          "cache (HF_HUB_CACHE), run with network access, or pass a checkpoint directory "
                          "(config.json + model.safetensors)") from None
    return Init(model, spec, "checkpoint", init, image_size or _image_size_of(spec.model_args))


def _recorded_config(init: str, like: str | None) -> dict[str, Any] | None:
    """The config.json of the run or checkpoint --init (or --like) names; None for a timm name or plain scratch."""
    if init == "scratch" and like is None:
        return None
    p = Path(like if init == "scratch" else init).expanduser()
    return _read_config(p if p.is_dir() else p.parent) if p.exists() else None


def student_name(init: str, student: str = "fd-vit-tiny", like: str | None = None) -> str:
    """The name of the student --init starts from, read before any model is built (the recipe's size comes from it,
    and drop path is set when the model is built): --student or --like's run for scratch, a run or checkpoint's
    config.json name (its architecture if it has none), else --init itself (a timm name)."""
    if init == "scratch" and like is None:
        return student
    config = _recorded_config(init, like)
    if config is None:  # a timm name, or a path build() refuses with its own line
        return init
    return str(config.get("name", config["architecture"]))


def recorded_image_size(init: str, like: str | None = None) -> int | None:
    """The input size the run or checkpoint was trained at (its config.json's img_size), read without building it.

    A distilled student keeps it by default: its grid is the one its position tables were trained on, and the
    teacher-matched grid is FD's 224 for FD's pairs (ViT-B/16 of CLIP-B/16, ViT-L/14 of CLIP-L/14)."""
    config = _recorded_config(init, like)
    return _image_size_of(config.get("model_args") or {}) if config is not None else None


def build(init: str, num_classes: int, *, drop_path: float = 0.1, image_size: int | None = None,
          student: str = "fd-vit-tiny", patch_size: int | None = None, like: str | None = None,
          new_head: bool = False) -> Init:
    """Dispatch on --init: 'scratch', a distilled run, any other checkpoint or a timm name."""
    if init == "scratch":
        return scratch(num_classes, drop_path, student, image_size, patch_size, like)
    if like is not None:
        raise FdpipeError("--like only goes with --init scratch (it copies a run's architecture, not its weights)")
    return from_checkpoint(init, num_classes, drop_path, image_size, new_head)
