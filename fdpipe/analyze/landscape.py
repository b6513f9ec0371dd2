"""Loss-landscape curves: what the loss is computed on (store targets or labels) and the model it sweeps.

The FD loss goes through the run's projector for --store's teacher. A run distilled from several teachers has one
per teacher: the one whose store (by fingerprint) or teacher (online runs) is --store's is used; a one-teacher run's
projector.safetensors is used whatever the store, as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import FdpipeError
from .attention import loss_landscape
from .checkpoints import Loaded
from .images import Images, image_batches
from .settings import AnalyzeConfig


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
            xs = list(image_batches(images, ck.transform, cfg.batch_size))
            return [(x, y[i * cfg.batch_size:i * cfg.batch_size + len(x)]) for i, x in enumerate(xs)]

        return LandscapeData("ce", {"loss": "cross-entropy", "data": images.spec, "images": len(images.images)},
                             ce_inputs)

    from ..data import open_source
    from ..replay import open_replay
    from ..store import open_store

    store = open_store(cfg.store)
    if store.settings.target != "features":
        raise FdpipeError(f"{cfg.store} holds teacher {store.settings.target}; the FD-loss landscape needs a "
                          f"features store")
    if not store.random_access:
        raise FdpipeError(f"{cfg.store} is a wds store; the landscape reads targets by index: convert it with "
                          f"`fdpipe store convert SRC DST --format zarr`")
    rows = store.index_columns(["status", "key"])
    status = rows.column("status").to_pylist()[:: store.views]
    chosen = [i for i, st in enumerate(status) if st == "ok"][: cfg.images]
    if not chosen:
        raise FdpipeError(f"{cfg.store} has no decodable images to compute the loss on")
    keys = rows.column("key").to_pylist()[:: store.views]
    # the views are replayed from --data when it holds the store's images (a moved copy), else from the store's own
    # source; the replay checks every image's sha256 either way
    source = open_source(images.spec) if cfg.data else None
    if source is None or not {keys[i] for i in chosen} <= set(source.keys):
        source = open_source(store.settings.data_spec)

    def store_inputs(ck: Loaded) -> list[tuple[torch.Tensor, torch.Tensor]]:
        replay = open_replay(store, ck.transform, source=source)
        batches = [replay.read([(i, 0) for i in chosen[s:s + n]])
                   for s, n in ((s, cfg.batch_size) for s in range(0, len(chosen), cfg.batch_size))]
        return [(replay.inputs(b), replay.targets(b)) for b in batches]

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
    from ..models import Distiller

    t = ld.store.teacher
    heads = _run_heads(ck.run_dir)
    head, why = _head_for_store(heads, ld.store)
    if ck.spec.init:  # the projector is drawn next from the RNG, as distill does: RUN@init gets the run's own
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(ck.rng_after_init)
            for before in heads[:heads.index(head)] if head is not None and len(heads) > 1 else []:
                nn.Linear(ck.model.num_features, int(before["channels"]))  # the heads distill drew first
            distiller = Distiller(ck.model, t.channels, t.grid, t.num_prefix_tokens)
        return distiller, None
    if why is not None:
        return None, why
    distiller = Distiller(ck.model, t.channels, t.grid, t.num_prefix_tokens)
    name = head["projector"] if head is not None else "projector.safetensors"
    proj = ck.run_dir / name if ck.run_dir is not None else None
    if proj is None or not proj.is_file():
        return None, f"no {name} (not a distill run); the FD loss needs the run's projector"
    from safetensors.torch import load_file

    sd = load_file(str(proj))
    try:
        distiller.projector.load_state_dict(sd)
    except RuntimeError:
        shape = tuple(sd["weight"].shape) if "weight" in sd else "?"
        return None, (f"its projector {shape} does not map {ck.model.num_features} channels to the store's "
                      f"{t['channels']}; it was distilled from another teacher")
    return distiller, None


def _run_heads(run_dir: Path | None) -> list[dict[str, Any]]:
    """The teachers (and their projector files) a distill run's config.json names; [] for other checkpoints."""
    from ..models.checkpoint import run_teachers

    path = run_dir / "config.json" if run_dir is not None else None
    if path is None or not path.is_file():
        return []
    try:
        return run_teachers(json.loads(path.read_text()))
    except (ValueError, UnicodeDecodeError):
        return []


_SAME_TEACHER = ("timm_name", "weights_sha256", "layer", "image_size", "grid", "channels", "num_prefix_tokens")


def _head_for_store(heads: list[dict[str, Any]], store: Any) -> tuple[dict[str, Any] | None, str | None]:
    """The run's head for `store`'s teacher, or why there is none: by store fingerprint, else (online runs) by the
    teacher's identity; a one-teacher run's head whatever the store (its shape is checked when it loads)."""
    if len(heads) <= 1:
        return (heads[0] if heads else None), None
    for h in heads:
        if h.get("store_fingerprint") and h["store_fingerprint"] == store.fingerprint:
            return h, None
    t = store.teacher.to_dict()
    for h in heads:
        ht = h.get("teacher") or {}
        if ht and all(ht.get(k) == t.get(k) for k in _SAME_TEACHER):
            return h, None
    names = ", ".join(str(h.get("name")) for h in heads)
    return None, (f"it was distilled from {len(heads)} teachers ({names}), none of them {store.url}'s; pass one of "
                  f"its stores as --store for the FD loss through that teacher's projector")


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

    from ..models import fd_loss

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
