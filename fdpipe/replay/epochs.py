"""The samples a student trains on, epoch by epoch: the one place that builds distill's data loaders.

`Replay.loader(epoch, start)` gives this rank's batches of (student view, target) for an epoch from sample `start`
on, with the same order, resume position and DDP split as `fdpipe distill`, because distill calls it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ..augment import AugmentationPlan, ViewTransform
from ..data import ImageSource
from ..errors import FdpipeError
from ..store import Store
from .datasets import EpochSampler, OnlineReplay, StoreReplay, WdsReplay, samples_per_epoch


@dataclass
class Replay:
    """Epochs of replayed views: from a zarr store (random access), a wds store (streamed) or a live teacher.

    For a wds store `dataset` is None: each epoch streams a fresh `WdsReplay`.
    """

    source: ImageSource | None
    transform: ViewTransform | None
    views: int
    seed: int = 0
    rank: int = 0
    world: int = 1
    store: Store | None = None
    dataset: Dataset | None = None
    valid: np.ndarray | None = None
    buffer: int = 256
    strict: bool = False
    teacher_transform: ViewTransform | None = None  # online mode: how the live teacher sees the view

    # ----------------------------------------------------------------- what the training process does with a batch
    def inputs(self, batch: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        """The student's views, float32 and normalized on `device` (they cross the DataLoader as uint8)."""
        return self.transform.normalize(batch["x"].to(device, non_blocking=True))

    def teacher_inputs(self, batch: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        """Online mode: the live teacher's views of the same crops, normalized its own way on `device`."""
        return self.teacher_transform.normalize(batch["teacher_x"].to(device, non_blocking=True))

    def targets(self, batch: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        """float32 targets on `device`: the stored values (and int8 scales) dequantized there, as the store's
        quantizer says."""
        values = batch["target"].to(device, non_blocking=True)
        scales = batch.get("scales")
        return self.store.quantizer.dequantize_tensor(
            values, None if scales is None else scales.to(device, non_blocking=True))

    def samples_per_epoch(self, epoch: int = 0) -> int:
        """This rank's samples in `epoch` (the same on every rank; for wds it changes from epoch to epoch)."""
        if self.dataset is None:
            return len(WdsReplay(self.store, self.source, self.transform, self.seed, epoch, self.rank, self.world))
        return samples_per_epoch(self.valid, self.world)

    def epoch(self, epoch: int, start: int = 0, batch_size: int = 1) -> Dataset | IterableDataset:
        """This rank's samples of `epoch` from sample `start` on, in training order: a map-style Dataset (zarr,
        online) or an IterableDataset (wds: `start` and `batch_size` say which samples its DataLoader's batches
        already delivered, and those are not read)."""
        if self.dataset is None:
            return WdsReplay(self.store, self.source, self.transform, self.seed, epoch, self.rank, self.world,
                             buffer=self.buffer, strict=self.strict, start=start, batch_size=batch_size)
        return EpochDataset(self.dataset, EpochSampler(self.valid, self.views, self.seed, epoch, self.rank,
                                                       self.world, start=start).pairs)

    def loader(self, epoch: int, start: int = 0, batch_size: int = 64, workers: int = 0,
               pin_memory: bool = False) -> Iterable[dict[str, Any]]:
        """This rank's batches of `epoch` from sample `start` on (a multiple of batch_size): what distill trains on."""
        return DataLoader(self.epoch(epoch, start, batch_size), batch_size=batch_size, num_workers=workers,
                          drop_last=True, pin_memory=pin_memory,
                          generator=torch.Generator().manual_seed(self.seed))  # off the global RNG


class EpochDataset(Dataset):
    """One epoch's (image_idx, view) pairs of a replay dataset, in order: item j is the epoch's j-th sample."""

    def __init__(self, dataset: Dataset, pairs: list[tuple[int, int]]):
        self.dataset, self.pairs = dataset, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int) -> dict[str, Any]:
        return self.dataset[self.pairs[j]]

    def __getitems__(self, js: list[int]) -> list[dict[str, Any]]:
        """A whole batch at once, so a store reads the batch's targets in one round."""
        pairs = [self.pairs[j] for j in js]
        many = getattr(self.dataset, "__getitems__", None)
        return many(pairs) if many is not None else [self.dataset[p] for p in pairs]


def open_replay(store: Store, transform: ViewTransform | None, *, source: ImageSource | None = None, seed: int = 0,
                rank: int = 0, world: int = 1, strict: bool = False, buffer: int = 256,
                images: bool = True) -> Replay:
    """A store's views for a student, as `fdpipe distill` replays them; `source` defaults to the store's images.

    images=False: targets only (batches without "x"), in the same order; no source is opened.
    """
    if source is None and images:
        source = store_source(store)
    if store.layout == "wds":
        return Replay(source, transform, store.views, seed, rank, world, store=store, buffer=buffer, strict=strict)
    dataset = StoreReplay(store, source, transform, strict=strict)
    return Replay(source, transform, store.views, seed, rank, world, store=store, dataset=dataset,
                  valid=dataset.valid)


def online_replay(source: ImageSource, plan: AugmentationPlan, transform: ViewTransform,
                  teacher_transform: ViewTransform, *, seed: int = 0, rank: int = 0, world: int = 1) -> Replay:
    """The plan's views of `source` for a live teacher: batches carry `teacher_x` instead of `target`."""
    dataset = OnlineReplay(source, plan, transform, teacher_transform)
    return Replay(source, transform, plan.views, seed, rank, world, dataset=dataset, valid=dataset.valid,
                  teacher_transform=teacher_transform)


def store_source(store: Store, spec: str | None = None) -> ImageSource:
    """The images a store was extracted from (or `spec` instead, which must hold them all)."""
    from ..data import open_source

    data = store.manifest["data"]
    if not spec and not data.get("spec"):
        raise FdpipeError(f"{store.url} was merged from several image sources; pass --data with a source that "
                          "holds all of its images")
    return open_source(spec or data["spec"], limit=None if spec else data.get("limit"))
