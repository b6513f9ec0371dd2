"""The samples a student trains on, epoch by epoch: the one place that builds distill's and finetune's data loaders.

`Replay.loader(epoch, start)` gives this rank's batches of (student view, target) for an epoch from sample `start`
on, with the same order, resume position and DDP split as `fdpipe distill`, because distill calls it too.

A `Replay` is one of three sources, each a class with the same few methods (`samples_per_epoch`, `epoch`, `loader`,
`inputs`, `targets` or `teacher_inputs`, and `read` where the source has random access): `ZarrReplay` (zarr stores,
random access), `WdsReplay` (wds stores, streamed) and `OnlineReplay` (live teachers). `open_replay` picks the
store's by `Store.streams`; `online_replay` makes the live one.

One teacher is a mapping of one: every replay carries {teacher: store} (or {teacher: transform}) and its batches
{teacher: target}. Opened from one `Store` (or one teacher transform), `targets(batch)` (or `teacher_inputs`) gives
that teacher's tensor, unwrapped at this edge; from a list or dict of stores, {teacher: targets}. Several stores
must agree on the layout, the plan, the images and (wds) the shard size (`check_stores_agree`); the data order is
then the one a single store gives.

What a caller passes in instead of patching: `targets=` (a `TargetReader`, or {teacher: reader}) reads a zarr
replay's targets in place of its store; `select=` (a mask over the store's images) replays only those images, in
the order the epoch gives them (finetune's label-scarce selection).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Iterable

import numpy as np
import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, IterableDataset, SequentialSampler,
                              default_collate)

from ..augment import AugmentationPlan, ViewTransform
from ..data import ImageSource
from ..errors import FdpipeError
from ..store import Store
from .datasets import EpochSampler, LiveViews, StoredViews, StreamedViews, TargetReader, samples_per_epoch


class Replay:
    """Epochs of replayed views: what every source shares (the student's side, the DataLoader, the edge where one
    teacher's {teacher: value} is unwrapped). A subclass holds `dataset` (map-style, over (image_idx, view)) and
    `valid` (the images an epoch replays), or overrides `samples_per_epoch` and `epoch` (a streamed source)."""

    dataset: Dataset | None = None
    valid: np.ndarray | None = None
    fresh_views: bool = False

    def __init__(self, names: Sequence[str], single: bool, source: ImageSource | None,
                 transform: ViewTransform | None, views: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.names, self.single = list(names), single
        self.source, self.transform, self.views = source, transform, views
        self.seed, self.rank, self.world = seed, rank, world

    @property
    def teachers(self) -> list[str]:
        """The teachers' names, in order: the keys of {teacher: targets}."""
        return list(self.names)

    def edge(self, named: dict[str, Any]) -> Any:
        """{teacher: value} as the caller opened it: the value itself for one Store (or one teacher transform)."""
        return named[self.names[0]] if self.single else named

    # ----------------------------------------------------------------- what the training process does with a batch
    def inputs(self, batch: dict[str, Any], device: torch.device | str = "cpu") -> torch.Tensor:
        """The student's views, float32 and normalized on `device` (they cross the DataLoader as uint8, or as the
        store's encoded views, decoded here in one batch on the device)."""
        if "x_encoded" in batch:
            pixels = self.dataset.pixels
            x = pixels.decode_batch(batch["x_encoded"], batch["image_idx"].tolist(), batch["view"].tolist(),
                                    self.dataset.rows.keys, device)
            return self.transform.normalize(x)
        return self.transform.normalize(batch["x"].to(device, non_blocking=True))

    def named_targets(self, batch: dict[str, Any], device: torch.device | str = "cpu",
                      coefficients: bool = False) -> dict[str, torch.Tensor]:
        """{teacher: float32 targets} on `device` (a store's replay); coefficients: a pca-K store's K coefficients
        a token, not their reconstruction."""
        raise FdpipeError(f"{type(self).__name__} has no stored targets; its batches carry the teachers' inputs")

    def named_teacher_inputs(self, batch: dict[str, Any], device: torch.device | str = "cpu"
                             ) -> dict[str, torch.Tensor]:
        """{teacher: its normalized views} on `device` (a live teacher's replay)."""
        raise FdpipeError(f"{type(self).__name__} replays stored targets; it has no live teacher's inputs")

    def targets(self, batch: dict[str, Any], device: torch.device | str = "cpu") -> Any:
        """`named_targets`, as the caller opened the replay: one Store's tensor, or {teacher: targets}."""
        return self.edge(self.named_targets(batch, device))

    def teacher_inputs(self, batch: dict[str, Any], device: torch.device | str = "cpu") -> Any:
        """`named_teacher_inputs`, as the caller opened the replay: one transform's tensor, or {teacher: views}."""
        return self.edge(self.named_teacher_inputs(batch, device))

    # ----------------------------------------------------------------------------------------------- the epochs
    def samples_per_epoch(self, epoch: int = 0) -> int:
        """This rank's samples in `epoch` (the same on every rank; for wds it changes from epoch to epoch)."""
        return samples_per_epoch(self.valid, self.world)

    def epoch(self, epoch: int, start: int = 0, batch_size: int = 1) -> Dataset | IterableDataset:
        """This rank's samples of `epoch` from sample `start` on, in training order: a map-style Dataset (zarr,
        online) or an IterableDataset of whole batches (wds: `start` and `batch_size` say which samples its
        DataLoader's batches already delivered, and those are not read)."""
        return EpochDataset(self.dataset, EpochSampler(self.valid, self.views, self.seed, epoch, self.rank,
                                                       self.world, start=start, fresh=self.fresh_views).pairs)

    def read(self, pairs: Sequence[tuple[int, int]]) -> dict[str, Any]:
        """The collated batch of the given (image_idx, view) pairs, in that order (random access: analyze's
        landscape reads view 0 of chosen images)."""
        return EpochDataset(self.dataset, [(int(i), int(v)) for i, v in pairs]).batch(list(range(len(pairs))))

    def loader(self, epoch: int, start: int = 0, batch_size: int = 64, workers: int = 0,
               pin_memory: bool = False) -> Iterable[dict[str, Any]]:
        """This rank's batches of `epoch` from sample `start` on (a multiple of batch_size): what distill and
        finetune train on."""
        data = self.epoch(epoch, start, batch_size)
        common = dict(num_workers=workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(self.seed))  # off the global RNG
        if isinstance(data, IterableDataset):  # wds: the dataset yields whole batches (StreamedViews)
            return DataLoader(data, batch_size=None, **common)
        # map-style: the dataset makes each batch whole (EpochDataset.batch), in the epoch's order
        return DataLoader(data, batch_size=None, sampler=BatchSampler(SequentialSampler(data), batch_size, True),
                          **common)


class StoredReplay(Replay):
    """Targets from stores ({teacher: store}): dequantized in the training process, as each store's quantizer says."""

    def __init__(self, stores: Mapping[str, Store], single: bool, source: ImageSource | None,
                 transform: ViewTransform | None, seed: int = 0, rank: int = 0, world: int = 1):
        self.stores = dict(stores)
        first = next(iter(self.stores.values()))
        super().__init__(list(self.stores), single, source, transform, first.views, seed, rank, world)

    def named_targets(self, batch: dict[str, Any], device: torch.device | str = "cpu",
                      coefficients: bool = False) -> dict[str, torch.Tensor]:
        """float32 targets on `device`: the stored values (and int8 scales) dequantized there, as each store's
        quantizer says (coefficients: a pca-K store's coefficients, without the product by its basis)."""
        for n, st in self.stores.items():
            refuse_zero_batch(st, batch["target"][n])
        scales = batch.get("scales") or {}
        return ({n: st.quantizer.dequantize_tensor(
            batch["target"][n].to(device, non_blocking=True),
            scales[n].to(device, non_blocking=True) if n in scales else None, coefficients=coefficients)
            for n, st in self.stores.items()})


class ZarrReplay(StoredReplay):
    """zarr stores, read by (image_idx, view): an epoch is `EpochSampler`'s pairs of the valid images, batched."""

    def __init__(self, stores: Mapping[str, Store], single: bool, source: ImageSource | None,
                 transform: ViewTransform | None, seed: int = 0, rank: int = 0, world: int = 1, strict: bool = False,
                 readers: Mapping[str, TargetReader] | None = None, select: np.ndarray | None = None,
                 stored_pixels: bool = False, encoded: bool = False):
        super().__init__(stores, single, source, transform, seed, rank, world)
        self.dataset = StoredViews(self.stores, source, transform, strict=strict, readers=readers,
                                   stored_pixels=stored_pixels, encoded=encoded)
        self.valid = self.dataset.valid if select is None else self.dataset.valid & np.asarray(select, dtype=bool)


class WdsReplay(StoredReplay):
    """wds stores, streamed: each epoch is a fresh `StreamedViews` (shard order, buffer, resume position)."""

    def __init__(self, stores: Mapping[str, Store], single: bool, source: ImageSource | None,
                 transform: ViewTransform | None, seed: int = 0, rank: int = 0, world: int = 1, strict: bool = False,
                 buffer: int = 256, stored_pixels: bool = False):
        super().__init__(stores, single, source, transform, seed, rank, world)
        self.strict, self.buffer, self.stored_pixels = strict, buffer, stored_pixels

    def samples_per_epoch(self, epoch: int = 0) -> int:
        return len(StreamedViews(self.stores, None, None, self.seed, epoch, self.rank, self.world))

    def epoch(self, epoch: int, start: int = 0, batch_size: int = 1) -> IterableDataset:
        return StreamedViews(self.stores, self.source, self.transform, self.seed, epoch, self.rank, self.world,
                             buffer=self.buffer, strict=self.strict, start=start, batch_size=batch_size,
                             stored_pixels=self.stored_pixels)

    def read(self, pairs: Sequence[tuple[int, int]]) -> dict[str, Any]:
        raise FdpipeError(f"{next(iter(self.stores.values())).url} is streamed (wds) and cannot be read by (image, view); convert it with "
                          "`fdpipe store convert SRC DST --format zarr`")


class OnlineReplay(Replay):
    """Live teachers: batches carry {teacher: input} (`teacher_x`), each teacher's crop of the same view."""

    def __init__(self, source: ImageSource, plan: AugmentationPlan, transform: ViewTransform,
                 teacher_transforms: Mapping[str, ViewTransform], single: bool, seed: int = 0, rank: int = 0,
                 world: int = 1, fresh_views: bool = False, view_codec: Any = None):
        super().__init__(list(teacher_transforms), single, source, transform, plan.views, seed, rank, world)
        self.teacher_transforms = dict(teacher_transforms)
        self.dataset = LiveViews(source, plan, transform, self.teacher_transforms, view_codec)
        self.valid, self.fresh_views = self.dataset.valid, fresh_views

    def named_teacher_inputs(self, batch: dict[str, Any], device: torch.device | str = "cpu"
                             ) -> dict[str, torch.Tensor]:
        """The live teachers' views of the same crops, each normalized its own way on `device`."""
        return ({n: tf.normalize(batch["teacher_x"][n].to(device, non_blocking=True))
                          for n, tf in self.teacher_transforms.items()})


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

    def __init__(self, dataset: Dataset, pairs: np.ndarray | Sequence[tuple[int, int]]):
        self.dataset, self.pairs = dataset, np.asarray(pairs, dtype=np.int64).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j: int | list[int]) -> dict[str, Any]:
        """Sample j, or the collated batch of the samples js (what `Replay.loader` asks for)."""
        return self.batch(j) if isinstance(j, list) else self.dataset[tuple(self.pairs[j].tolist())]

    def batch(self, js: list[int]) -> dict[str, Any]:
        """A collated batch: a store reads the batch's targets in one round, into one array."""
        pairs = [tuple(p) for p in self.pairs[js].tolist()]
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
                strict: bool = False, buffer: int = 256, images: bool = True,
                targets: TargetReader | Mapping[str, TargetReader] | None = None,
                select: np.ndarray | None = None, view_source: str = "auto",
                decode_on_device: bool = False) -> Replay:
    """A store's views for a student, as `fdpipe distill` replays them; `source` defaults to the store's images.

    images=False: targets only (batches without "x"), in the same order; no source is opened.

    view_source (see `pixel_source`): "auto" takes the store's own student views when it holds them at the
    transform's size and interpolation and no `source` is given, else crops the source images; "store" insists
    on the stored views, "data" on the source. decode_on_device (zarr, JPEG views): the loader hands over the
    views' bytes and `inputs(batch, device)` decodes each batch there at once (nvJPEG on CUDA: distill sets it on
    CUDA), instead of decoding them in the loader's workers.

    Several stores (a list, named by `teacher_names` of their teachers' aliases, or {name: store}): one replay of
    their shared plan whose `targets(batch)` are {name: targets}, the same (image_idx, view) pairs for every store.

    targets: what reads the targets instead of the store (zarr): a `TargetReader` for one Store, {name: reader}
    for several. select: a bool mask over the store's images; only those are replayed (zarr).
    """
    from ..store.consistency import check_index

    single = isinstance(store, Store)
    if single:
        stores = {teacher_names([store.teacher.alias])[0]: store}
    elif isinstance(store, Mapping):
        stores = dict(store)
    else:
        stores = dict(zip(teacher_names([s.teacher.alias for s in store]), store))
    if not stores:
        raise FdpipeError("open_replay needs at least one store")
    for st in stores.values():
        check_index(st)  # the index against the manifest, before any step (what verify checks of it)
    listed = list(stores.values())
    check_stores_agree(listed)
    first = listed[0]
    readers = {next(iter(stores)): targets} if single and targets is not None else dict(targets or {})
    if set(readers) - set(stores):
        raise ValueError(f"targets= names {sorted(set(readers) - set(stores))}, not among the stores {list(stores)}")
    stored = images and pixel_source(first, transform, view_source, source is not None)[0]
    if source is None and images and not stored:
        source = store_source(first)
    if first.streams:
        if readers or select is not None:
            raise FdpipeError(f"{first.url} is streamed (wds): targets= and select= need random access; convert it "
                              "with `fdpipe store convert SRC DST --format zarr`")
        return WdsReplay(stores, single, source, transform, seed, rank, world, strict=strict, buffer=buffer,
                         stored_pixels=stored)
    encoded = bool(stored and decode_on_device and first.student_views.codec == "jpeg")
    return ZarrReplay(stores, single, source, transform, seed, rank, world, strict=strict, readers=readers,
                      select=select, stored_pixels=stored, encoded=encoded)


VIEW_SOURCES = ("auto", "store", "data")


def pixel_source(store: Store, transform: ViewTransform | None, choice: str = "auto",
                 data_given: bool = False) -> tuple[bool, str]:
    """(whether the student's pixels come from the store's own views, the one line that says where they come
    from and how to choose). Never both: a run takes every view from the store or every view from the source.

    auto: the stored views when the store holds them at the transform's size and interpolation and no --data is
    given; store: those views or a one-line refusal; data: the source images (--data, or the recorded source)."""
    if choice not in VIEW_SOURCES:
        raise FdpipeError(f"--view-source {choice}: choose one of {', '.join(VIEW_SOURCES)}")
    views = store.student_views
    if transform is None:
        return False, ""
    size = "x".join(map(str, transform.size))
    if views is None:
        if choice == "store":
            raise FdpipeError(f"{store.url} holds no student views (extract it with --student-views SIZE); drop "
                              "--view-source store to crop the source images")
        return False, f"student views: cropped from the source images ({size} px {transform.interpolation})"
    fits = views.matches(transform.size, transform.interpolation)
    if choice == "store" and not fits:
        raise FdpipeError(f"{store.url} holds {views.label} student views; this student takes {size} px "
                          f"{transform.interpolation}: pass --image-size {views.size} to use them, or --view-source "
                          "data to crop the source images")
    if choice == "store" or (choice == "auto" and fits and not data_given):
        return True, f"student views: the store's own ({views.label}); no source is opened"
    why = ("--view-source data" if choice == "data" else "--data was given" if fits else
           f"the store's are {views.label}, this student takes {size} px {transform.interpolation} (--image-size "
           f"{views.size} would use them)")
    return False, f"student views: cropped from the source images, not the store's ({why})"


def online_replay(source: ImageSource, plan: AugmentationPlan, transform: ViewTransform,
                  teacher_transform: ViewTransform | Mapping[str, ViewTransform], *, seed: int = 0, rank: int = 0,
                  world: int = 1, fresh_views: bool = False, view_codec: Any = None) -> Replay:
    """The plan's views of `source` for live teachers: batches carry `teacher_x` instead of `target` ({teacher:
    input} for a dict of teacher transforms, one per live teacher; one transform's replay gives its tensor).
    fresh_views: epoch e takes view e of every image instead of one of the plan's V, so every epoch sees new crops.
    view_codec (fdpipe.viewcodec.StudentViews): the student's views pass through its encode and decode, as a store
    of student views gives them, so that online equals cached."""
    single = not isinstance(teacher_transform, Mapping)
    transforms = {"teacher": teacher_transform} if single else dict(teacher_transform)
    return OnlineReplay(source, plan, transform, transforms, single, seed=seed, rank=rank, world=world,
                        fresh_views=fresh_views, view_codec=view_codec)


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
    from ..store.consolidated import decodable

    table = store.images  # checked first: a seed or a count that disagrees names the alteration more precisely
    keys = table.column("key").to_pylist()
    ok = decodable(table).tolist()
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
