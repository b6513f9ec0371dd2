"""Which checkpoints analyze compares and how each is built: parsing CKPT, loading it, checking it is a ViT.

A checkpoint (CKPT) is one of:

- a run directory or a ``.safetensors`` file with fdpipe's ``config.json`` beside it (distilled student, fine-tuned
  model), loaded through ``models.load_model``;
- a teacher alias or a timm model name, with the weights fdpipe finds for teachers (lite0 package, HF cache,
  network when online);
- ``NAME@PATH``: a teacher alias or timm name with weights from a file (safetensors, state dict, CLIP checkpoint);
- ``CKPT@init``: the same architecture at random initialisation. For a distill run it is re-created with the seed the
  run recorded, which gives the run's own starting weights (student and projector); otherwise with ``--seed``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..augment import ViewTransform
from ..errors import FdpipeError

INIT = "init"


@dataclass(frozen=True)
class CheckpointSpec:
    """CKPT as written by the user, split into what to build and which weights to put in it."""

    text: str
    source: str
    weights: str | None = None  # None: the checkpoint's own; "init": random init; else a weights file

    @property
    def init(self) -> bool:
        return self.weights == INIT

    @property
    def is_path(self) -> bool:
        return Path(self.source).expanduser().exists()


def _check_not_a_missing_path(source: str) -> None:
    """Names never hold '/' or a weights suffix (hf-hub:/local-dir: aside), so such a source is a missing path."""
    if source.startswith(("hf-hub:", "local-dir:")):
        return
    if "/" in source or "\\" in source or source.endswith((".safetensors", ".pth", ".pt", ".bin", ".json")):
        raise FdpipeError(f"checkpoint not found: {source}; check the path (a run directory or a .safetensors file)")


def parse_checkpoint(text: str) -> CheckpointSpec:
    """'RUN', 'RUN@init', 'vit_small_patch16_224', 'clip-b@/w/clip.pt': an existing path wins over the '@' forms."""
    text = text.strip()
    if not text:
        raise FdpipeError("empty checkpoint name; pass a run directory, a timm name, or NAME@init")
    if Path(text).expanduser().exists():
        return CheckpointSpec(text, text)
    if "@" not in text:
        _check_not_a_missing_path(text)
        return CheckpointSpec(text, text)
    source, _, weights = text.rpartition("@")
    if not source:
        raise FdpipeError(f"checkpoint {text!r} has nothing before '@'; write NAME@init or NAME@WEIGHTS")
    if weights == INIT:
        return CheckpointSpec(text, source, INIT)
    if Path(source).expanduser().exists():
        raise FdpipeError(f"{text!r}: a run directory takes only '@init'; to load other weights point at a "
                          f".safetensors file with its config.json beside it")
    _check_not_a_missing_path(source)
    if not Path(weights).expanduser().is_file():
        raise FdpipeError(f"{text!r}: weights file {weights!r} not found; write NAME@PATH with an existing file, "
                          f"or NAME@init for random weights")
    return CheckpointSpec(text, source, weights)


def checkpoint_labels(specs: list[CheckpointSpec]) -> list[str]:
    """Short unique names for plots: a path's last component (keeping '@init'), a name as written."""
    out: list[str] = []
    for s in specs:
        if s.is_path:
            p = Path(s.source).expanduser()
            base = p.name if p.is_dir() else f"{p.parent.name}/{p.name}"
            label = base + ("@init" if s.init else "")
        else:
            label = s.source + ("@init" if s.init else f"@{Path(s.weights).name}" if s.weights else "")
        n, unique = 2, label
        while unique in out:
            unique, n = f"{label}#{n}", n + 1
        out.append(unique)
    return out


@dataclass
class Loaded:
    """A model ready to analyse, with what analysis needs to know about it."""

    label: str
    spec: CheckpointSpec
    model: nn.Module
    architecture: str
    transform: ViewTransform
    grid: tuple[int, int]
    patch_size: tuple[int, int]
    prefix: int
    run_dir: Path | None  # an fdpipe run directory (its projector feeds the distill-loss landscape)
    init_seed: int | None
    rng_after_init: torch.Tensor | None  # CPU RNG state right after a random init (the projector's init follows)
    description: dict[str, Any] = field(default_factory=dict)


def _read_config(spec: CheckpointSpec) -> tuple[Path, dict[str, Any]]:
    p = Path(spec.source).expanduser()
    cfg_path = (p if p.is_dir() else p.parent) / "config.json"
    if not cfg_path.is_file():
        raise FdpipeError(f"no config.json beside {p}; point at a run directory written by fdpipe, or write "
                          f"ARCH@{p} to load these weights into a timm architecture")
    from ..models.checkpoint import check_config

    try:
        config = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FdpipeError(f"{cfg_path} is not valid JSON ({e}); re-save the checkpoint") from None
    check_config(config, cfg_path)
    return cfg_path.parent, config


def recorded_seed(config: dict[str, Any]) -> int | None:
    """The seed a distill run created its student from; None for other runs (a fine-tune starts from weights)."""
    fd = config.get("fdpipe")
    if not isinstance(fd, dict) or fd.get("stage") != "distill":
        return None
    seed = fd.get("config", {}).get("seed") if isinstance(fd.get("config"), dict) else None
    return int(seed) if isinstance(seed, int) else None


def _create_random(arch: str, seed: int, **kwargs: Any) -> tuple[nn.Module, torch.Tensor]:
    """timm's random init from torch.manual_seed(seed), as distill creates its student, leaving the global RNG as it
    was; also returns the RNG state right after, from which distill went on to initialise the projector."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = timm.create_model(arch, pretrained=False, **kwargs)
        except TypeError as e:
            if "img_size" not in kwargs:
                raise FdpipeError(f"cannot build {arch} at random init ({e}); analyze takes ViTs") from None
            kwargs.pop("img_size")  # a CNN takes no img_size: build it anyway so the ViT check names the problem
            torch.manual_seed(seed)
            model = timm.create_model(arch, pretrained=False, **kwargs)
        return model, torch.get_rng_state()


def _build(spec: CheckpointSpec, image_size: int | None, seed: int) -> tuple[nn.Module, dict[str, Any]]:
    """The model and what is known about where it came from (architecture, run dir, config, init seed)."""
    from ..models import check_model_size, create_teacher, load_model, resolve_teacher_name

    size = {"img_size": image_size} if image_size else {}
    info: dict[str, Any] = {"run_dir": None, "config": {}, "init_seed": None, "rng_after_init": None}
    if spec.is_path:
        run_dir, config = _read_config(spec)
        info.update(run_dir=run_dir, config=config, architecture=config["architecture"])
        if spec.init:
            s = recorded_seed(config)
            info["init_seed"] = seed if s is None else s
            args = {**config.get("model_args", {}), **size}
            check_model_size(args, str(run_dir / "config.json"))
            model, info["rng_after_init"] = _create_random(config["architecture"], info["init_seed"], **args)
            return model, info
        with warnings.catch_warnings():  # timm's rel-pos table resampling warns about torch internals
            warnings.filterwarnings("ignore", category=UserWarning, module=r"timm\.layers\.")
            model, _, _ = load_model(spec.source, **size)
        return model, info
    name = resolve_teacher_name(spec.source)
    info["architecture"] = name
    if spec.init:  # the full name keeps its tag's pretrained_cfg (mean, std); no weights are read
        info["init_seed"] = seed
        model, info["rng_after_init"] = _create_random(name, seed, **size)
        return model, info
    teacher = create_teacher(spec.source, weights=spec.weights, image_size=image_size)
    return teacher.model, info


def load_checkpoint(spec: CheckpointSpec, label: str, image_size: int | None, seed: int) -> Loaded:
    """Build one checkpoint and check it is a ViT whose attention analyze can read."""
    import timm

    model, info = _build(spec, image_size, seed)
    pe = getattr(model, "patch_embed", None)
    if pe is None or getattr(pe, "grid_size", None) is None or not hasattr(model, "blocks"):
        raise FdpipeError(f"{spec.text} ({type(model).__name__}) is not a ViT with a patch grid; analyze reads "
                          f"ViT attention (fd-vit students, timm ViT/BEiT/DeiT/CLIP models)")
    grid = (int(pe.grid_size[0]), int(pe.grid_size[1]))
    patch = tuple(int(p) for p in pe.patch_size)
    size = tuple(int(s) for s in pe.img_size)
    dc = timm.data.resolve_model_data_config(model)
    saved = info["config"].get("pretrained_cfg", {}) if isinstance(info["config"].get("pretrained_cfg"), dict) else {}
    for k in ("mean", "std", "interpolation"):
        if k in saved:
            dc[k] = saved[k]
    dc["input_size"] = (3, *size)
    transform = ViewTransform.from_data_config(dc)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    model.eval()
    desc = {
        "label": label,
        "checkpoint": spec.text,
        "architecture": info.get("architecture", type(model).__name__),
        "init": spec.init,
        "init_seed": info["init_seed"],
        "weights": spec.weights if spec.weights not in (None, INIT) else None,
        "image_size": list(size),
        "patch_size": list(patch),
        "grid": list(grid),
        "num_prefix_tokens": prefix,
        "mean": list(transform.mean),
        "std": list(transform.std),
        "interpolation": transform.interpolation,
    }
    return Loaded(label, spec, model, desc["architecture"], transform, grid, patch, prefix, info["run_dir"],
                  info["init_seed"], info["rng_after_init"], desc)
