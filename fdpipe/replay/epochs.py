"""The samples a student trains on, epoch by epoch: the one place that builds distill's data loaders.

`Replay.loader(epoch, start)` gives this rank's batches of (student view, target) for an epoch from sample `start`
on, with the same order, resume position and DDP split as `fdpipe distill`, because distill calls it too.

Several teachers: `open_replay([store1, store2], ...)` (or {name: store}) replays their shared plan once, and
`Replay.targets(batch)` gives {teacher: targets}. The stores must agree on the layout, the plan, the images and (wds)
the shard size (`check_stores_agree`); the data order is then the one a single store gives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler,
                              default_collate)

from ..augment import AugmentationPlan, ViewTransform
from ..data import ImageSource
from ..errors import FdpipeError
from ..store import Store
from .datasets import (EpochSampler, MultiStoreReplay, OnlineReplay, StoreReplay, WdsReplay, ZippedWdsReplay,
                       samples_per_epoch)


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
    teacher_transform: ViewTransform | dict[str, ViewTransform] | None = None  # online: how live teachers see it
    stores: dict[str, Store] | None = None  # several teachers: {teacher: store}; `store` is the first of them
    fresh_views: bool = False  # online mode: epoch e takes view e of every image (`order.fresh_views`)

    @property
    def teachers(self) -> list[str] | None:
        """The teachers' names, in order, when targets come as {teacher: targets}; None for one teacher."""
        if self.stores is not None:
            return list(self.stores)
        return list(self.teacher_transform) if isinstance(self.teacher_transform, dict) else None

    # ----------------------------------------------------------------- what the training process does with a batch
    def inputs(self, batch: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        """The student's views, float32 and normalized on `device` (they cross the DataLoader as uint8)."""
        return self.transform.normalize(batch["x"].to(device, non_blocking=True))

    def teacher_inputs(self, batch: dict[str, Any], device: torch.device | str = "cpu"
                       ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Online mode: the live teacher's views of the same crops, normalized its own way on `device` ({teacher:
        views} for several teachers)."""
        if isinstance(self.teacher_transform, dict):
            return {n: self.teacher_transform[n].normalize(x.to(device, non_blocking=True))
                    for n, x in batch["teacher_x"].items()}
        return self.teacher_transform.normalize(batch["teacher_x"].to(device, non_blocking=True))

    def targets(self, batch: dict[str, Any], device: torch.device | str = "cpu"
                ) -> torch.Tensor | dict[str, torch.Tensor]:
        """float32 targets on `device`: the stored values (and int8 scales) dequantized there, as the store's
        quantizer says; {teacher: targets} for several stores."""
        for n, st in (self.stores or {None: self.store}).items():
            refuse_zero_batch(st, batch["target"] if n is None else batch["target"][n])
        if self.stores is not None:
            scales = batch.get("scales") or {}
            return {n: st.quantizer.dequantize_tensor(
                batch["target"][n].to(device, non_blocking=True),
                scales[n].to(device, non_blocking=True) if n in scales else None) for n, st in self.stores.items()}
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
        if self.dataset is None and self.stores is not None:
            return ZippedWdsReplay({n: WdsReplay(st, self.source if i == 0 else None, self.transform, self.seed,
                                                 epoch, self.rank, self.world, buffer=self.buffer, strict=self.strict,
                                                 start=start, batch_size=batch_size)
                                    for i, (n, st) in enumerate(self.stores.items())})
        if self.dataset is None:
            return WdsReplay(self.store, self.source, self.transform, self.seed, epoch, self.rank, self.world,
                             buffer=self.buffer, strict=self.strict, start=start, batch_size=batch_size)
        return EpochDataset(self.dataset, EpochSampler(self.valid, self.views, self.seed, epoch, self.rank,
                                                       self.world, start=start, fresh=self.fresh_views).pairs)

    def loader(self, epoch: int, start: int = 0, batch_size: int = 64, workers: int = 0,
               pin_memory: bool = False) -> Iterable[dict[str, Any]]:
        """This rank's batches of `epoch` from sample `start` on (a multiple of batch_size): what distill trains on."""
        data = self.epoch(epoch, start, batch_size)
        common = dict(num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(self.seed))  # off the global RNG
        if isinstance(data, IterableDataset):
            return DataLoader(data, batch_size=batch_size, drop_last=True, **common)
        # map-style: the dataset makes each batch whole (EpochDataset.batch), in the epoch's order
        return DataLoader(data, batch_size=None, sampler=BatchSampler(SequentialSampler(data), batch_size, True),
                          **common)


def refuse_zero_batch(store: Store, values: torch.Tensor) -> None:
    """Refuse, before the step, a batch (of 2 views or more) whose stored targets are every one zero: what verify
    --deep refuses of a store (a constant image may give one such view, a ReLU layer's zeros whitened; no batch of
    them). The values are still on the host: no wait for the device. Each view's first token answers for nearly
    every batch (1/T of the bytes); only a batch whose first tokens are all zero is read whole."""
    if len(values) > 1 and values.device.type == "cpu" and values.dim() > 2 and bool(values[:, 0].any()):
        return
    if len(values) > 1 and values.device.type == "cpu" and not bool(values.any()):
        raise FdpipeError(f"{store.url}: every target of this batch of {len(values)} views is zero; the store's values "
                          "were overwritten: run `fdpipe store verify --deep` and replace it")


class EpochDataset(Dataset):
    """One epoch's (image_idx, view) pairs of a replay dataset, in order: item j is the epoch's j-th sample."""

    def __init__(self, dataset: Dataset, pairs: list[tuple[int, int]]):
        self.dataset, self.pairs = dataset, pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int | list[int]) -> dict[str, Any]:
        """Sample j, or the collated batch of the samples js (what `Replay.loader` asks for)."""
        return self.batch(j) if isinstance(j, list) else self.dataset[self.pairs[j]]

    def batch(self, js: list[int]) -> dict[str, Any]:
        """A collated batch: a store reads the batch's targets in one round, into one array."""
        pairs = [self.pairs[j] for j in js]
        whole = getattr(self.dataset, "batch", None)
        return whole(pairs) if whole is not None else default_collate([self.dataset[p] for p in pairs])


def teacher_names(aliases: Sequence[str]) -> list[str]:
    """Names for several teachers' heads, log fields and files: each alias with characters outside [A-Za-z0-9_-]
    made '_', and a repeated one numbered (effnet-lite0, effnet-lite0-2)."""
    out: list[str] = []
    for alias in aliases:
        base = re.sub(r"[^A-Za-z0-9_-]+", "_", str(alias)).strip("_") or "teacher"
        name, k = base, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out.append(name)
    return out


# what the stores of several teachers must share, checked in this order: the first that differs is named
AGREE = ("layout", "plan", "views", "num_images", "dataset_fingerprint")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:16] + "..."


def check_stores_agree(stores: Sequence[Store]) -> None:
    """Refuse, in one line naming the field, stores that cannot be replayed together: another layout, plan, view
    count, image count or dataset (the manifests' dataset_fingerprint), or for wds another shard size."""
    from ..store.manifest import describe_value, first_difference

    if not stores:
        return
    a = stores[0]
    keys = AGREE + (("shard_size",) if a.streams else ())
    for b in stores[1:]:
        for key in keys:
            va, vb = a.manifest.get(key), b.manifest.get(key)
            if va == vb:
                continue
            field, inner = key, first_difference(va, vb) if isinstance(va, dict) and isinstance(vb, dict) else None
            if inner:  # the plan: name the setting within it (plan.seed)
                field, va, vb = f"{key}.{inner}", describe_value(va, inner), describe_value(vb, inner)
            raise FdpipeError(f"the stores differ in {field} ({_short(va)} in {a.url}, {_short(vb)} in {b.url}); "
                              "several teachers' stores must share the plan and the images: extract them with the "
                              "same --data, --limit, --seed, --views, --crop-scale and --format"
                              f"{' and --shard-size' if key == 'shard_size' else ''}")


def open_replay(store: Store | Sequence[Store] | Mapping[str, Store], transform: ViewTransform | None, *,
                source: ImageSource | None = None, seed: int = 0, rank: int = 0, world: int = 1,
                strict: bool = False, buffer: int = 256, images: bool = True) -> Replay:
    """A store's views for a student, as `fdpipe distill` replays them; `source` defaults to the store's images.

    images=False: targets only (batches without "x"), in the same order; no source is opened.

    Several stores (a list, named by `teacher_names` of their teachers' aliases, or {name: store}): one replay of
    their shared plan whose `targets(batch)` are {name: targets}, the same (image_idx, view) pairs for every store.
    """
    from ..store.consistency import check_index

    for st in [store] if isinstance(store, Store) else (store.values() if isinstance(store, Mapping) else store):
        check_index(st)  # the index against the manifest, before any step (what verify checks of it)
    if not isinstance(store, Store):
        stores = dict(store) if isinstance(store, Mapping) else dict(zip(
            teacher_names([s.teacher.alias for s in store]), store))
        if not stores:
            raise FdpipeError("open_replay needs at least one store")
        listed = list(stores.values())
        check_stores_agree(listed)
        first = listed[0]
        if source is None and images:
            source = store_source(first)
        if first.streams:
            return Replay(source, transform, first.views, seed, rank, world, store=first, buffer=buffer,
                          strict=strict, stores=stores)
        dataset = MultiStoreReplay(stores, source, transform, strict=strict)
        return Replay(source, transform, first.views, seed, rank, world, store=first, dataset=dataset,
                      valid=dataset.valid, stores=stores)
    if source is None and images:
        source = store_source(store)
    if store.streams:
        return Replay(source, transform, store.views, seed, rank, world, store=store, buffer=buffer, strict=strict)
    dataset = StoreReplay(store, source, transform, strict=strict)
    return Replay(source, transform, store.views, seed, rank, world, store=store, dataset=dataset,
                  valid=dataset.valid)


def online_replay(source: ImageSource, plan: AugmentationPlan, transform: ViewTransform,
                  teacher_transform: ViewTransform | dict[str, ViewTransform], *, seed: int = 0, rank: int = 0,
                  world: int = 1, fresh_views: bool = False) -> Replay:
    """The plan's views of `source` for a live teacher: batches carry `teacher_x` instead of `target` ({teacher:
    input} for a dict of teacher transforms, one per live teacher). fresh_views: epoch e takes view e of every
    image instead of one of the plan's V, so every epoch sees new crops."""
    dataset = OnlineReplay(source, plan, transform, teacher_transform)
    return Replay(source, transform, plan.views, seed, rank, world, dataset=dataset, valid=dataset.valid,
                  teacher_transform=teacher_transform, fresh_views=fresh_views)


def store_source(store: Store, spec: str | None = None) -> ImageSource:
    """The images a store was extracted from (or `spec` instead, which must hold them all), checked against the
    store's index (`check_source`). A recorded spec is absolute; one recorded relative (by an earlier fdpipe)
    resolves against the working directory."""
    from ..data import open_source

    data = store.manifest["data"]
    if not spec and not data.get("spec"):
        raise FdpipeError(f"{store.url} was merged from several image sources; pass --data with a source that "
                          "holds all of its images")
    source = open_source(spec or data["spec"], limit=None if spec else data.get("limit"))
    check_source(store, source)
    return source


def check_source(store: Store, source: ImageSource) -> None:
    """Refuse, before any step, a source that lacks one of the store's decodable images; and when it is the source
    the store records (its spec, as many images), one whose images sit in another order: a store's rows pair each
    position with its image, so rows moved from one image to another (seeds and hashes with them) would pair
    targets with the wrong pictures. Keys only: no image is read (their sha256 is checked as each is decoded)."""
    from ..data import absolute_spec
    from ..store.consistency import check_index

    check_index(store)  # first: a seed or a count that disagrees names the alteration more precisely
    keys, ok = [], []
    for shard in range(store.num_shards):
        part = store.index_part(shard)
        keys += part.column("key").to_pylist()[::store.views]
        ok += [s == "ok" for s in part.column("status").to_pylist()[::store.views]]
    recorded = store.manifest["data"].get("spec")
    if isinstance(recorded, str) and source.spec == absolute_spec(recorded) and len(source) == len(keys):
        moved = next((i for i, (a, b) in enumerate(zip(keys, source.keys)) if a != b), None)
        if moved is not None:
            raise FdpipeError(f"{store.url}: image {moved} of the store is {keys[moved]!r}, but {source.spec} has "
                              f"{source.keys[moved]!r} there: the store's rows were moved between images, or the "
                              "images changed since it was made; run `fdpipe store verify --deep`, or extract a new "
                              "store")
        return
    have = set(source.keys)
    missing = next((k for k, good in zip(keys, ok) if good and k not in have), None)
    if missing is not None:
        raise FdpipeError(f"image {missing!r} of the store is not in the source {source.spec}; pass the --data the "
                          "store was extracted from")
