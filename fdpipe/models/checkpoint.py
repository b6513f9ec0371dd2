"""Checkpoints any plain timm can load without fdpipe: safetensors weights plus a timm-style config.json."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from torch import nn

import timm
import timm.data

from fdpipe.errors import FdpipeError
from fdpipe.files import replacing
from fdpipe.runtime import read_torch

from ..jsonable import json_able
from .helpers import first_line
from .students import STUDENTS, StudentSpec, check_model_size, student_grid
from .weights import drop_overlay_state_dict, load_pretrained

_RESERVED = ("architecture", "model_args", "num_classes", "num_features", "pretrained_cfg", "name", "weights")
_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")
# what timm's loader adapts a checkpoint by (the input conv, the head to drop for another class count); a
# local-dir: load reads only this file's pretrained_cfg, not the registry's
_ADAPT_KEYS = ("fixed_input_size", "first_conv", "classifier")


def save_model(model: nn.Module, out_dir: str | os.PathLike, filename: str, spec: StudentSpec,
               extra: Mapping[str, Any] | None = None) -> Path:
    """Write <filename> (safetensors) and a timm-style config.json, each atomically; returns the weights path.

    The pair loads in plain timm as saved (head, input size and normalization included):
    create_model("local-dir:<out_dir>", pretrained=True) when W is the only safetensors file there (or is
    model.safetensors), or create_model(architecture, pretrained=True, **model_args,
    pretrained_cfg_overlay=dict(file=W, **pretrained_cfg)). The first is also what timm's train.py takes:
    --model local-dir:<out_dir> --pretrained --num-classes K.
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
    with replacing(weights) as tmp:
        safetensors.torch.save_file(sd, tmp, metadata={"format": "pt"})

    dc = timm.data.resolve_model_data_config(model)
    gh, gw = student_grid(model) if getattr(model, "patch_embed", None) is not None else (None, None)
    if spec.image_size is not None:
        dc["input_size"] = (3, spec.image_size, spec.image_size)
    elif gh is not None:
        ps = model.patch_embed.patch_size
        dc["input_size"] = (3, gh * ps[0], gw * ps[1])
    num_classes = int(getattr(model, "num_classes", 0) or 0)
    adapt = getattr(model, "pretrained_cfg", None) or {}
    config = {
        "architecture": spec.architecture,
        "num_classes": num_classes,
        "num_features": int(getattr(model, "num_features", 0) or 0),
        "model_args": dict(spec.model_args),
        "pretrained_cfg": {"architecture": spec.architecture, **_tag(spec), **{k: dc[k] for k in _DATA_KEYS},
                           **{k: adapt[k] for k in _ADAPT_KEYS if adapt.get(k) is not None},
                           "num_classes": num_classes},
        "name": spec.name,
        "weights": filename,
        **extra,
    }
    text = json.dumps(json_able(config), indent=2, sort_keys=False) + "\n"
    with replacing(out / "config.json") as tmp:
        Path(tmp).write_text(text)
    return weights


def _tag(spec: StudentSpec) -> dict[str, str]:
    """timm names a checkpoint architecture.tag: an fd-vit student's tag is its own name (fd_vit_tiny), since its
    architecture is the nearest Beit timm registers (beit_base_patch16_224 for tiny, small and base)."""
    return {"tag": spec.name.replace("-", "_")} if spec.name in STUDENTS else {}


def _overlay(config: Mapping[str, Any], weights: Path, args: Mapping[str, Any]) -> dict[str, Any]:
    """The pretrained_cfg_overlay that loads `weights` as saved: the config's pretrained_cfg (an older config has
    only some of it) with the input size of an img_size override, so the model's data config matches the model."""
    saved = config.get("pretrained_cfg")
    overlay = {k: tuple(v) if isinstance(v, list) else v for k, v in (saved if isinstance(saved, dict) else {}).items()
               if k not in ("file", "url", "hf_hub_id", "state_dict", "source")}
    if args.get("img_size") is not None and args.get("img_size") != config.get("model_args", {}).get("img_size"):
        s = args["img_size"]
        overlay["input_size"] = (3, *((s, s) if isinstance(s, int) else tuple(s)))
    overlay["num_classes"] = int(config.get("num_classes", config.get("model_args", {}).get("num_classes", 0)))
    return {**overlay, "file": str(weights)}


def check_config(config: Any, path: Path) -> None:
    """Refuse a config.json (read from `path`) whose fields a loader would trip on or be led astray by, in one line:
    an architecture that is not a timm name, model_args that are not keyword arguments, weights outside its folder."""
    if not isinstance(config, dict):
        raise FdpipeError(f"{path} holds a {type(config).__name__}, not a model config; re-save the checkpoint")
    arch = config.get("architecture")
    if not isinstance(arch, str) or not timm.is_model(timm.models.split_model_name_tag(arch)[0]):
        raise FdpipeError(f"{path}: architecture is {arch!r:.100}, not a timm model name; re-save the checkpoint")
    args = config.get("model_args") or {}
    if not isinstance(args, dict) or not all(isinstance(k, str) and k.isidentifier() for k in args):
        raise FdpipeError(f"{path}: model_args is {args!r:.100}, not keyword arguments of {arch}; re-save the "
                          "checkpoint")
    weights = config.get("weights", "student.safetensors")
    parts = PurePosixPath(weights).parts if isinstance(weights, str) else ()
    if not parts or PurePosixPath(weights).is_absolute() or ".." in parts or "\\" in weights:
        raise FdpipeError(f"{path}: weights is {weights!r:.100}, not the name of a file in {path.parent}; re-save the "
                          "checkpoint")


@contextlib.contextmanager
def config_args_checked(path: Path, model_args: Mapping[str, Any], arch: str):
    """Building a model from a config.json's model_args: a keyword its architecture does not take is that file's
    fault, and is refused in one line naming it (timm raises a TypeError)."""
    try:
        yield
    except TypeError as e:
        m = re.search(r"unexpected keyword argument '([^']+)'", str(e))
        if m is None or m.group(1) not in model_args:
            raise
        raise FdpipeError(f"{path}: model_args has {m.group(1)!r}, which {arch} does not take; remove it or re-save "
                          "the checkpoint") from None


_MAX_HEADER = 100 << 20  # what the safetensors library itself allows a header


def check_safetensors(path: Path) -> None:
    """Refuse a .safetensors file that is not whole, in one line naming it, before any reader maps it: its header
    length and every tensor's data offsets must lie inside the file."""
    def refuse(why: str) -> None:
        raise FdpipeError(f"{path} is not a whole safetensors file: {why}; re-save the checkpoint or copy it again")

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else 0
        if len(head) < 8 or n > min(size - 8, _MAX_HEADER):
            refuse(f"its header claims {n:,} bytes and the file has {size:,}" if len(head) == 8 else
                   f"it has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            header = None
    if not isinstance(header, dict):
        refuse("its header is not a JSON object")
    data = size - 8 - n
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            refuse(f"tensor {name!r:.100} has no valid data_offsets")
        if offsets[1] > data:
            refuse(f"tensor {name!r:.100} ends at byte {offsets[1]:,} of {data:,} bytes of data (truncated?)")


def load_weights(path: Path) -> dict[str, Any]:
    """A checkpoint's state dict: a .safetensors file (checked whole first), else a torch file of tensors."""
    if path.suffix != ".safetensors":
        sd = read_torch(path, str(path), "re-save the checkpoint")
        if not isinstance(sd, dict):
            raise FdpipeError(f"{path} holds a {type(sd).__name__}, not a state dict; re-save the checkpoint")
        return sd
    import safetensors
    import safetensors.torch

    check_safetensors(path)
    try:
        return safetensors.torch.load_file(str(path))
    except safetensors.SafetensorError as e:
        raise FdpipeError(f"{path} is not a whole safetensors file ({first_line(e)}); re-save the checkpoint") \
            from None


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
        except (ValueError, UnicodeDecodeError) as e:
            raise FdpipeError(f"{cfg_path} is not a model config ({first_line(e)}); re-save the checkpoint") from None
        check_config(config, cfg_path)
        arch, model_args = config["architecture"], dict(config.get("model_args") or {})
        weights = p if p.is_file() else p / str(config.get("weights", "student.safetensors"))
        if not weights.is_file():
            raise FdpipeError(f"checkpoint weights not found: {weights}; the run may not have saved yet")
        if weights.suffix == ".safetensors":
            check_safetensors(weights)
        args = {**model_args, **overrides}
        check_model_size(args, str(cfg_path))
        try:
            with config_args_checked(cfg_path, {k: v for k, v in model_args.items() if k not in overrides}, arch):
                model = timm.create_model(arch, pretrained=True,
                                          pretrained_cfg_overlay=_overlay(config, weights, args), **args)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise FdpipeError(f"checkpoint {weights} does not load into {arch} ({first_line(e)}); "
                              f"check the overrides") from None
        drop_overlay_state_dict(model)
        spec = StudentSpec(name=str(config.get("name", arch)), architecture=arch, model_args=args)
        return model, spec, config
    if s.startswith(("hf-hub:", "local-dir:")):
        try:
            model = timm.create_model(s, pretrained=True, **overrides)
        except Exception as e:  # noqa: BLE001
            raise FdpipeError(f"cannot load '{s}' ({first_line(e)}); check the name or path") from None
        return model, StudentSpec(name=s, architecture=s, model_args=dict(overrides)), {}
    if "/" in s or s.endswith((".safetensors", ".pth", ".pt", ".bin")):
        raise FdpipeError(f"checkpoint not found: {s}; check the path")
    arch, _ = timm.models.split_model_name_tag(s)
    if not timm.is_model(arch):
        raise FdpipeError(f"'{s}' is neither a checkpoint path nor a timm model name; check the name")
    model, _ = load_pretrained(s, s, None, None, what="model", **overrides)
    return model, StudentSpec(name=s, architecture=arch, model_args=dict(overrides)), {}


# ------------------------------------------------------------------------------------------ distill's projectors

PROJECTOR = "projector.safetensors"  # the one teacher's head in a run saved before heads/
HEADS = "heads"  # the run dir's own safetensors is then only the student, which timm's local-dir: loader takes


def projector_filename(name: str | None) -> str:
    """A distill run's head file, relative to the run: heads/projector.safetensors for one teacher,
    heads/projector-<name>.safetensors per teacher for several (config.json's teachers name it)."""
    return f"{HEADS}/{PROJECTOR if name is None else f'projector-{name}.safetensors'}"


def save_projector(projector: nn.Module, out_dir: str | os.PathLike, filename: str) -> Path:
    """A projection head's state dict (weight, bias) as safetensors, atomically."""
    import safetensors.torch

    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu").contiguous() for k, v in projector.state_dict().items()}
    with replacing(path) as tmp:
        safetensors.torch.save_file(sd, tmp)
    return path


def run_teachers(config: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The teachers a distill run's config.json names, each with its projector file, in the run's order; a run
    saved before several teachers (no 'teachers' entry) has its one head in projector.safetensors."""
    fd = config.get("fdpipe") if isinstance(config, Mapping) else None
    if not isinstance(fd, Mapping) or fd.get("stage") != "distill":
        return []
    teachers = fd.get("teachers")
    if isinstance(teachers, list) and all(isinstance(t, Mapping) and isinstance(t.get("projector"), str)
                                          for t in teachers):
        return [dict(t) for t in teachers]
    targets = fd.get("targets") if isinstance(fd.get("targets"), Mapping) else {}
    teacher = targets.get("teacher") if isinstance(targets.get("teacher"), Mapping) else {}
    return [{"name": teacher.get("alias"), "projector": PROJECTOR,
             "store_fingerprint": fd.get("store_fingerprint"), "teacher": dict(teacher)}]
