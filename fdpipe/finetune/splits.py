"""Which images fine-tuning trains and evaluates on: a labelled source or a logits store's views, the
label-scarce selection, the held-out split, and what a resume must agree on."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data import open_source
from ..errors import FdpipeError
from ..runtime import Ranks
from .data import EpochOrder, Labelled, check_val_classes, labelled, open_val, select_indices
from .settings import FinetuneConfig


@dataclass
class TrainData:
    """Where the training samples come from: a labelled source (plain) or a logits store's views (replay)."""

    source: Any
    selected: np.ndarray  # image indices trained on (source rows, or store image_idx)
    labels: np.ndarray  # label of every source row / store image
    num_classes: int
    classes: list[str] | None
    spec: str
    store: Any = None
    valid: np.ndarray | None = None  # store mode: mask of images to replay (`open_replay(select=)`)

    def sampler(self, seed: int, epoch: int, ranks: Ranks, start: int) -> EpochOrder:
        """A labelled source's order of the selected images (a store's is its replay's: `Replay.loader`)."""
        return EpochOrder(self.selected, seed, epoch, ranks.rank, ranks.world, start)


def _num_classes(cfg: FinetuneConfig, labels: np.ndarray, source: Any) -> int:
    found = int(source.num_classes or (int(labels.max()) + 1 if len(labels) else 0))
    if cfg.num_classes is None:
        if found < 2:
            raise FdpipeError(f"{source.spec} has {found} class; fine-tuning needs at least two")
        return found
    if len(labels) and int(labels.max()) >= cfg.num_classes:
        raise FdpipeError(f"--num-classes {cfg.num_classes} but {source.spec} has labels up to {int(labels.max())} "
                          f"({found} classes); drop --num-classes or fix the labels")
    return cfg.num_classes


def train_data(cfg: FinetuneConfig) -> TrainData:
    if cfg.teacher_store is None:
        source = open_source(cfg.data, storage_options=cfg.storage_options or None)
        labels = labelled(source.labels, source.spec)
        k = _num_classes(cfg, labels, source)
        sel = select_indices(labels, cfg.seed, cfg.labels_per_class, cfg.train_limit, num_classes=k,
                             class_names=source.classes)
        return TrainData(source, sel, labels, k, source.classes, source.spec)
    from ..store import open_store

    store = open_store(cfg.teacher_store, cfg.storage_options)
    if store.settings.target != "logits":
        raise FdpipeError(f"{cfg.teacher_store} holds teacher {store.settings.target}, not logits; make a "
                          "logits store with fdpipe extract --target logits")
    if not store.random_access:
        raise FdpipeError(f"{cfg.teacher_store} is a {store.layout} store; --teacher-store needs random access: "
                          "convert it with fdpipe store convert --format zarr")
    recorded = store.settings
    source = open_source(cfg.data or recorded.data_spec, limit=None if cfg.data else recorded.data_limit,
                         storage_options=cfg.storage_options or None)
    idx = store.index_columns(["label", "status"])
    rows = idx.column("label").to_pylist()[:: store.views]
    ok = np.array([s == "ok" for s in idx.column("status").to_pylist()[:: store.views]])
    labels = labelled(rows, cfg.teacher_store)
    k = _num_classes(cfg, labels, source)
    sel = select_indices(labels, cfg.seed, cfg.labels_per_class, cfg.train_limit, candidates=np.flatnonzero(ok),
                         num_classes=k, class_names=source.classes)
    valid = np.zeros(store.num_images, dtype=bool)
    valid[sel] = True
    return TrainData(source, sel, labels, k, source.classes, source.spec, store=store, valid=valid)


@dataclass
class ValData:
    source: Any
    labels: np.ndarray
    indices: np.ndarray


def val_data(cfg: FinetuneConfig, td: TrainData) -> ValData:
    """The held-out split (opened before any model is built, so a missing one fails fast)."""
    val = open_val(cfg.val, td.spec, cfg.storage_options or None)
    labels = labelled(val.labels, val.spec)
    check_val_classes(td.source, val, labels, td.num_classes)
    idx = np.arange(len(val))
    if cfg.val_limit is not None and cfg.val_limit < len(val):
        idx = select_indices(labels, cfg.seed, limit=cfg.val_limit)
    return ValData(val, labels, idx)


def val_loader(cfg: FinetuneConfig, vd: ValData, tf: Any, ranks: Ranks, device: torch.device) -> DataLoader:
    """This rank's strided share of the held-out images; evaluate() sums the counts over ranks."""
    mine = [int(i) for i in vd.indices[ranks.rank:: ranks.world]]
    return DataLoader(Labelled(vd.source, vd.labels, tf), batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                      sampler=mine, num_workers=cfg.workers, pin_memory=device.type == "cuda")


def setup_id(cfg: FinetuneConfig, td: TrainData) -> str:
    """What a resume must agree on: the start, the method, the classes and the exact training images."""
    h = hashlib.sha256()
    h.update(json.dumps([cfg.init, cfg.method, td.spec, td.num_classes, cfg.teacher_store]).encode())
    h.update(np.asarray(td.selected, dtype=np.int64).tobytes())
    return h.hexdigest()
