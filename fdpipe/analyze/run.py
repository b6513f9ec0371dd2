"""`fdpipe analyze`: attention diagnostics of one or more ViT checkpoints on the same images, side by side.

What is computed (FD paper, Sec. 4), per checkpoint, on N images of ``--data``:

- the attention-weighted mean distance between query and key patches, per head and layer (patch units; CLS and other
  prefix tokens left out, see ``attention.attention_distance``);
- the mean cosine similarity between the heads' attention maps within each layer (head diversity);
- the mean patch-to-patch attention map per layer (query x key, averaged over images and heads);
- optionally, 1-D loss curves along random filter-normalised directions (Li et al. 2018): the FD loss against a
  store's targets through the run's projector, or cross-entropy against ``--data``'s labels through the model's head.

Each image is seen as one view: the largest centred square (the whole image when it is square), resized to the
model's input size with its own interpolation and normalised with its own mean and std, through the same
``ViewTransform`` every fdpipe consumer uses. Analysis runs in float32 in eval mode; attention comes from timm's own
modules (``capture_attention``), so the relative position bias enters as the model applies it.

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

import io
import json
import platform
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..augment import AugParams, ViewTransform
from ..errors import FdpipeError
from ..runtime import atomic_write_bytes, atomic_write_json, progress, resolve_device
from .settings import DEFAULT_ALPHAS, AnalyzeConfig
from .attention import (
    attention_distance,
    capture_attention,
    head_cosine_similarity,
    loss_landscape,
    mean_attention_map,
)

INIT = "init"
FORMAT = "fdpipe-analysis"
FORMAT_VERSION = 1
MAPS_FILE = "attention_maps.npz"


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


def _labels(specs: list[CheckpointSpec]) -> list[str]:
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
    try:
        config = json.loads(cfg_path.read_text())
        ok = isinstance(config, dict) and isinstance(config.get("architecture"), str) \
            and isinstance(config.get("model_args", {}), dict)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FdpipeError(f"{cfg_path} is not valid JSON ({e}); re-save the checkpoint") from None
    if not ok:
        raise FdpipeError(f"{cfg_path} names no architecture and model_args; point at a checkpoint saved by fdpipe")
    return cfg_path.parent, config


def _recorded_seed(config: dict[str, Any]) -> int | None:
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
    from ..models import create_teacher, load_model, resolve_teacher_name

    size = {"img_size": image_size} if image_size else {}
    info: dict[str, Any] = {"run_dir": None, "config": {}, "init_seed": None, "rng_after_init": None}
    if spec.is_path:
        run_dir, config = _read_config(spec)
        info.update(run_dir=run_dir, config=config, architecture=config["architecture"])
        if spec.init:
            s = _recorded_seed(config)
            info["init_seed"] = seed if s is None else s
            args = {**config.get("model_args", {}), **size}
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


# --------------------------------------------------------------------------------------------------------- images


def centre_square(height: int, width: int) -> AugParams:
    """The largest centred square of an image: the 'whole image' view without distorting its aspect."""
    s = min(height, width)
    return AugParams(top=(height - s) // 2, left=(width - s) // 2, height=s, width=s, flip=False)


@dataclass
class Images:
    keys: list[str]
    images: list[Any]  # decoded PIL RGB images
    labels: list[int | None]
    skipped: list[str]
    spec: str


def load_images(spec: str, n: int) -> Images:
    """The first n images of the source that decode; undecodable ones are skipped and named."""
    from ..data import ImageError, decode_rgb, open_source

    source = open_source(spec)
    keys, images, labels, skipped = [], [], [], []
    for i in range(len(source)):
        if len(images) >= n:
            break
        try:
            sample = source[i]
            images.append(decode_rgb(sample.data))
        except ImageError as e:
            skipped.append(f"{source.keys[i]}: {e}")
            continue
        keys.append(sample.key)
        labels.append(sample.label)
    if not images:
        raise FdpipeError(f"no decodable images in {spec}"
                          + (f" ({len(skipped)} failed, first: {skipped[0]})" if skipped else " (it is empty)"))
    return Images(keys, images, labels, skipped, source.spec)


def _batches(images: Images, transform: ViewTransform, batch_size: int):
    for start in range(0, len(images.images), batch_size):
        chunk = images.images[start:start + batch_size]
        yield torch.stack([transform(im, centre_square(im.height, im.width)) for im in chunk])


# ---------------------------------------------------------------------------------------------------- diagnostics


def uniform_distance(grid: tuple[int, int]) -> float:
    """Attention distance of uniform attention on this grid: the reference 'no locality' level in the plots."""
    n = grid[0] * grid[1]
    return float(attention_distance(torch.full((1, 1, n, n), 1.0 / n), grid, 0)[0])


def attention_stats(ck: Loaded, images: Images, batch_size: int, device: torch.device, bar) -> dict[str, Any]:
    """Distance per (layer, head), head cosine per layer and the mean map per layer, averaged over all images."""
    np_ = ck.grid[0] * ck.grid[1]
    dist: list[torch.Tensor] | None = None
    cos: list[float] = []
    maps: list[torch.Tensor] = []
    seen = 0
    for x in _batches(images, ck.transform, batch_size):
        b = x.shape[0]
        try:
            attn = capture_attention(ck.model, x.to(device))
        except ValueError as e:
            raise FdpipeError(f"{ck.spec.text}: {e}; analyze reads timm ViT attention") from None
        if any(a.ndim != 4 or a.shape[-1] != ck.prefix + np_ or a.shape[-2] != a.shape[-1] for a in attn):
            shapes = sorted({tuple(a.shape[1:]) for a in attn})
            raise FdpipeError(f"{ck.spec.text}: attention maps {shapes} do not cover {ck.prefix} prefix + "
                              f"{ck.grid[0]}x{ck.grid[1]} patch tokens (windowed or pooled attention?); "
                              f"analyze takes plain global-attention ViTs")
        if dist is None:
            dist = [torch.zeros(a.shape[1], dtype=torch.float64) for a in attn]
            cos = [0.0] * len(attn)
            maps = [torch.zeros(np_, np_, dtype=torch.float64) for _ in attn]
        for layer, a in enumerate(attn):
            dist[layer] += attention_distance(a, ck.grid, ck.prefix).double().cpu() * b
            if a.shape[1] > 1:
                cos[layer] += head_cosine_similarity(a, ck.prefix) * b
            maps[layer] += mean_attention_map(a, ck.prefix).double().cpu() * b
        seen += b
        del attn
        bar.update(b)
    assert dist is not None
    heads = [int(d.numel()) for d in dist]
    return {
        "layers": len(dist),
        "heads": heads[0] if len(set(heads)) == 1 else heads,
        "attention_distance": [[round(float(v) / seen, 6) for v in d] for d in dist],
        "attention_distance_mean": [round(float(d.mean()) / seen, 6) for d in dist],
        "head_cosine_similarity": [round(c / seen, 6) if h > 1 else None for c, h in zip(cos, heads)],
        "uniform_attention_distance": round(uniform_distance(ck.grid), 6),
        "_maps": torch.stack([m / seen for m in maps]).float().numpy(),
    }


# ------------------------------------------------------------------------------------------------- loss landscape


@dataclass
class LandscapeData:
    """What the loss is computed on: a list of (x, target) minibatches, and which loss it is."""

    kind: str  # "distill" or "ce"
    describe: dict[str, Any]
    make_inputs: Callable[[Loaded], list[tuple[torch.Tensor, torch.Tensor]]]
    store: Any = None


def landscape_data(cfg: AnalyzeConfig, images: Images) -> LandscapeData:
    """FD loss against the store's targets (view 0 of its first images), or CE against the images' labels."""
    if cfg.store is None:
        if any(label is None for label in images.labels):
            raise FdpipeError(f"--landscape without --store computes cross-entropy, but {images.spec} has no labels "
                              f"(use class subfolders or a labelled list); or pass --store STORE for the FD loss")
        y = torch.tensor(images.labels, dtype=torch.long)

        def ce_inputs(ck: Loaded) -> list[tuple[torch.Tensor, torch.Tensor]]:
            xs = list(_batches(images, ck.transform, cfg.batch_size))
            return [(x, y[i * cfg.batch_size:i * cfg.batch_size + len(x)]) for i, x in enumerate(xs)]

        return LandscapeData("ce", {"loss": "cross-entropy", "data": images.spec, "images": len(images.images)},
                             ce_inputs)

    from ..data import open_source
    from ..replay import StoreReplay
    from ..store import open_store

    store = open_store(cfg.store)
    if store.manifest.get("target") != "features":
        raise FdpipeError(f"{cfg.store} holds teacher {store.manifest.get('target')}; the FD-loss landscape needs a "
                          f"features store")
    if store.layout != "zarr":
        raise FdpipeError(f"{cfg.store} is a wds store; the landscape reads targets by index: convert it with "
                          f"`fdpipe store convert SRC DST --format zarr`")
    status = store.index.column("status").to_pylist()[:: store.views]
    chosen = [i for i, st in enumerate(status) if st == "ok"][: cfg.images]
    if not chosen:
        raise FdpipeError(f"{cfg.store} has no decodable images to compute the loss on")
    keys = store.index.column("key").to_pylist()[:: store.views]
    # the views are replayed from --data when it holds the store's images (a moved copy), else from the store's own
    # source; StoreReplay checks every image's sha256 either way
    source = open_source(images.spec) if cfg.data else None
    if source is None or not {keys[i] for i in chosen} <= set(source.keys):
        source = open_source(store.manifest["data"]["spec"])

    def store_inputs(ck: Loaded) -> list[tuple[torch.Tensor, torch.Tensor]]:
        replay = StoreReplay(store, source, ck.transform)
        items = [replay[(i, 0)] for i in chosen]
        return [(torch.stack([it["x"] for it in items[s:s + cfg.batch_size]]),
                 torch.stack([it["target"] for it in items[s:s + cfg.batch_size]]))
                for s in range(0, len(items), cfg.batch_size)]

    desc = {"loss": "fd smooth-L1 (beta 2)", "store": cfg.store, "store_fingerprint": store.fingerprint,
            "data": source.spec, "images": len(chosen), "view": 0}
    return LandscapeData("distill", desc, store_inputs, store)


def _landscape_model(ck: Loaded, ld: LandscapeData) -> tuple[nn.Module | None, str | None]:
    """The network whose loss is swept, or why there is none for this checkpoint."""
    if ld.kind == "ce":
        n = int(getattr(ck.model, "num_classes", 0) or 0)
        if n <= 0:
            return None, "no classifier head (num_classes 0); fine-tune it, or use --store for the FD loss"
        return ck.model, None
    from ..distill.student import Distiller

    t = ld.store.teacher
    if ck.spec.init:  # the projector is drawn next from the RNG, as distill does: RUN@init gets the run's own
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ck.rng_after_init)
            distiller = Distiller(ck.model, int(t["channels"]), tuple(t["grid"]), int(t["num_prefix_tokens"]))
        return distiller, None
    distiller = Distiller(ck.model, int(t["channels"]), tuple(t["grid"]), int(t["num_prefix_tokens"]))
    proj = ck.run_dir / "projector.safetensors" if ck.run_dir is not None else None
    if proj is None or not proj.is_file():
        return None, "no projector.safetensors (not a distill run); the FD loss needs the run's projector"
    from safetensors.torch import load_file

    sd = load_file(str(proj))
    try:
        distiller.projector.load_state_dict(sd)
    except RuntimeError:
        shape = tuple(sd["weight"].shape) if "weight" in sd else "?"
        return None, (f"its projector {shape} does not map {ck.model.num_features} channels to the store's "
                      f"{t['channels']}; it was distilled from another teacher")
    return distiller, None


def landscape_for(ck: Loaded, ld: LandscapeData, cfg: AnalyzeConfig, device: torch.device) -> dict[str, Any]:
    model, why = _landscape_model(ck, ld)
    if model is None:
        return {"skipped": why}
    model = model.to(device)
    batches = [(x.to(device), t.to(device)) for x, t in ld.make_inputs(ck)]
    n = sum(len(x) for x, _ in batches)
    if ld.kind == "ce":
        classes = int(ck.model.num_classes)
        top = max(int(t.max()) for _, t in batches)
        if top >= classes:
            return {"skipped": f"the head has {classes} classes but the labels go up to {top}; "
                               f"analyse a model fine-tuned on these labels"}

    from ..distill.student import fd_loss

    def loss_fn(m: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64, device=device)
        for x, t in data:
            out = m(x)
            if ld.kind == "ce":
                loss = F.cross_entropy(out.float(), t)
            else:
                loss = fd_loss(out, m.align_target(t))
            total += loss.double() * len(x)
        return total / n

    gen = torch.Generator().manual_seed(cfg.seed)  # the same draws for every checkpoint: comparable directions
    r = loss_landscape(model, loss_fn, batches, list(cfg.alphas), n_dirs=cfg.directions, generator=gen)
    r["losses"] = [[round(v, 6) for v in c] for c in r["losses"]]
    r["mean"] = [round(v, 6) for v in r["mean"]]
    r["center"] = round(r["center"], 6)
    return r


# ------------------------------------------------------------------------------------------------------- the run


def _versions() -> dict[str, str]:
    import timm

    from .. import __version__

    return {"fdpipe": __version__, "torch": torch.__version__, "timm": timm.__version__,
            "python": platform.python_version()}


def analyze(cfg: AnalyzeConfig) -> dict[str, Any]:
    """Run every diagnostic on every checkpoint; write the PNGs, analysis.json, attention_maps.npz, analysis.md."""
    from .report import write_markdown, write_plots

    t0 = time.time()
    device = resolve_device(cfg.device)
    specs = [parse_checkpoint(c) for c in cfg.checkpoints]
    labels = _labels(specs)
    data_spec = cfg.data
    if data_spec is None:
        from ..store import open_store

        data_spec = open_store(cfg.store).manifest["data"]["spec"]
    images = load_images(data_spec, cfg.images)
    ld = landscape_data(cfg, images) if cfg.landscape else None

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    maps: dict[str, np.ndarray] = {}
    bar = progress(total=len(specs) * len(images.images), desc="analyze", unit="img", disable=cfg.quiet)
    try:
        for i, (spec, label) in enumerate(zip(specs, labels)):
            ck = load_checkpoint(spec, label, cfg.image_size, cfg.seed)
            ck.model.to(device)
            stats = attention_stats(ck, images, cfg.batch_size, device, bar)
            key = f"checkpoint_{i}"
            maps[key] = stats.pop("_maps")
            entry = {**ck.description, **stats, "mean_attention_maps": {"file": MAPS_FILE, "key": key,
                                                                       "shape": list(maps[key].shape)}}
            if ld is not None:
                bar.set_postfix_str(f"landscape {label}")
                entry["landscape"] = landscape_for(ck, ld, cfg, device)
                bar.set_postfix_str("")
            results.append(entry)
            del ck
    finally:
        bar.close()

    buf = io.BytesIO()
    np.savez_compressed(buf, **maps)
    atomic_write_bytes(out / MAPS_FILE, buf.getvalue())
    analysis: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "data": images.spec,
        "images": len(images.images),
        "image_keys": images.keys,
        "skipped_images": images.skipped,
        "view": "largest centred square, resized to each model's input size, normalised with its mean/std",
        "units": {"attention_distance": "patches (multiply by patch_size for pixels)"},
        "seed": cfg.seed,
        "device": str(device),
        "checkpoints": results,
        "landscape": None if ld is None else {**ld.describe, "alphas": list(cfg.alphas),
                                              "directions": cfg.directions,
                                              "direction": "filter-normalised Gaussian (Li et al. 2018), "
                                                           "1-D parameters not perturbed"},
        "created": {**_versions(), "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
    }
    plots = write_plots(out, analysis, maps)
    analysis["plots"] = plots
    atomic_write_json(out / "analysis.json", analysis)
    write_markdown(out / "analysis.md", analysis, plots)
    return {"out": str(out), "checkpoints": labels, "images": len(images.images), "plots": plots,
            "seconds": time.time() - t0, "landscape_skipped": {
                r["label"]: r["landscape"]["skipped"] for r in results if "skipped" in r.get("landscape", {})}}


__all__ = ["AnalyzeConfig", "CheckpointSpec", "parse_checkpoint", "load_checkpoint", "load_images", "centre_square",
           "uniform_distance", "attention_stats", "analyze", "DEFAULT_ALPHAS"]
