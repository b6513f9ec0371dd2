"""Replaying the plan's views for the student, with targets from a store or from a live teacher.

The stored AugParams are authoritative: the student sees the same crop box the teacher saw, resized and normalized
its own way. `strict` re-derives the parameters from the plan's seed and refuses any mismatch; a source image whose
sha256 differs from the index means the dataset changed under the store, and is refused naming the key.

One teacher is a mapping of one: every dataset here takes {teacher: store} (or {teacher: transform} online) and its
items carry {teacher: target} (or {teacher: input}). Several teachers' stores share the plan and the images, so one
view serves them all: `StoredViews` (zarr, random access) reads every store's targets for the same (image_idx, view)
pairs, `StreamedViews` (wds) streams the stores side by side and checks each sample's (image_idx, view) agree, and
`LiveViews` (online) crops each teacher's input from the same view.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..augment import AugmentationPlan, AugParams, ViewTransform
from ..data import ImageError, ImageSource, decode_rgb, image_sha256
from ..errors import FdpipeError
from ..store import Store
from ..store.reader import StoredView
from .order import buffer_order, epoch_samples, epoch_views, fresh_views, round_robin_resume, shard_order, shard_views

if TYPE_CHECKING:
    import pyarrow as pa
    from PIL import Image


def source_lookup(source: ImageSource) -> dict[str, int]:
    return {k: i for i, k in enumerate(source.keys)}


class ViewBuilder:
    """What both replay datasets share: find the source image, check it, crop it for the student (and teacher)."""

    def __init__(self, source: ImageSource, plan: AugmentationPlan, student_tf: ViewTransform,
                 teacher_tf: Mapping[str, ViewTransform] | None = None, strict: bool = False, check_sha: bool = True):
        self.source, self.plan, self.student_tf, self.teacher_tf = source, plan, student_tf, teacher_tf
        self.strict, self.check_sha = strict, check_sha
        self.lookup = source_lookup(source)

    def image(self, key: str, sha: str | None):
        if key not in self.lookup:
            raise FdpipeError(f"image {key!r} of the store is not in the source {self.source.spec}; "
                              "pass the --data the store was extracted from")
        sample = self.source[self.lookup[key]]
        if self.check_sha and sha is not None and image_sha256(sample) != sha:
            raise FdpipeError(f"source image {key!r} differs from the one the store was made from (sha256 mismatch); "
                              "the dataset changed under the store: restore it or extract a new store")
        try:
            return self.plan.prepare(decode_rgb(sample.data))
        except ImageError as e:
            raise FdpipeError(f"image {key!r}: {e}") from None

    def check_params(self, key: str, view: int, params: AugParams, size: tuple[int, int]) -> None:
        want = self.plan.sample(key, view, size)
        if want != params:
            raise FdpipeError(f"--strict: stored params of {key!r} view {view} are {params}, the plan's seed gives "
                              f"{want}; the store was not made with this plan")

    def stored_view(self, key: str, view: int, row: dict[str, Any]) -> torch.Tensor:
        image = self.image(key, row.get("image_sha256"))
        recorded = (row.get("orig_height"), row.get("orig_width"))
        height, width = image_size(image)
        if None not in recorded and recorded != (height, width):  # the crop box is in those pixels
            raise FdpipeError(f"source image {key!r} is {height} x {width} pixels, the store recorded "
                              f"{recorded[0]} x {recorded[1]} for it (its crop boxes are in those pixels); the index "
                              "was altered or the dataset changed under the store: run `fdpipe store verify --deep`")
        params = AugParams.from_dict(row)
        if self.strict:
            self.check_params(key, view, params, (height, width))
        return self.student_tf.pixels(image, params)

    def live_views(self, key: str, view: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The student's pixels of one view and {teacher: pixels} of the same crop, one per teacher transform."""
        image = self.image(key, None)
        params = self.plan.sample(key, view, image_size(image))
        return self.student_tf.pixels(image, params), {n: tf.pixels(image, params) for n, tf in self.teacher_tf.items()}


def image_size(image: "Image.Image | torch.Tensor") -> tuple[int, int]:
    """(height, width) of what `plan.prepare` gave: a PIL image or a uint8 [3, H, W] tensor."""
    return (image.height, image.width) if hasattr(image, "height") else tuple(image.shape[-2:])


class StoredPixels:
    """The student's pixels from a store's own views (`fdpipe extract --student-views`): no source is opened.

    Each view's bytes were checked against their crc32c as they were read; a view that still does not decode (or
    decodes to another size) is one line naming the image and the view, before any step uses its batch."""

    def __init__(self, store: Store, encoded: bool = False):
        self.url, self.views = store.url, store.student_views
        self.encoded = encoded  # hand the bytes over: the training process decodes the batch on its device

    def decode(self, data: bytes | None, image_idx: int, view: int, key: str) -> torch.Tensor:
        """One view, uint8 [3, S, S]."""
        return self.decode_batch([data], [image_idx], [view], {image_idx: key}, "cpu")[0]

    def error(self, image_idx: int, view: int, key: str, why: str) -> FdpipeError:
        return FdpipeError(f"{self.url}: the stored student view of image {image_idx} ({key!r}) view {view} {why}; "
                           "nothing was trained on it: run `fdpipe store verify --deep` and extract that store again")

    def encoded_batch(self, data: list[bytes], pairs: list[tuple[int, int]], keys: list[str]) -> list[torch.Tensor]:
        """The views as 1-D uint8 tensors for the loader to hand over (one that is not a whole file of its codec
        refused here, as `decode` refuses it)."""
        out = []
        for (i, v), d in zip(pairs, data):
            problem = self.views.framing_problem(d)
            if problem:
                raise self.error(i, v, keys[i], problem)
            out.append(torch.frombuffer(bytearray(d), dtype=torch.uint8))
        return out

    def decode_batch(self, data: list[bytes | torch.Tensor | None], image_idx: list[int], view: list[int],
                     keys: Any, device: torch.device | str) -> torch.Tensor:
        """A batch's views decoded on `device` (nvJPEG on CUDA; on the CPU into one channels_last batch), or one
        line naming the (image, view) that is missing or fails. `keys[image_idx]` names an image."""
        missing = [j for j, d in enumerate(data) if d is None]
        try:
            if missing:
                raise ValueError(f"{missing[0]}: is missing")
            return self.views.decode_batch(data, device)
        except ValueError as e:
            j, _, why = str(e).partition(": ")
            j = int(j)
            raise self.error(image_idx[j], view[j], keys[image_idx[j]], why) from None


PARAMS = ("top", "left", "height", "width", "flip", "orig_height", "orig_width")


class TargetReader(Protocol):
    """What replay reads a batch of targets from: a `Store`, or anything a caller passes in its place (targets held
    in memory by a benchmark): values [B, *target_shape] as stored, and int8 scales or None."""

    def stored_targets(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]: ...


class Strings:
    """A string column read by position (`keys[i]`) without a Python object per row: ImageNet's 1.28M keys and
    hashes as Python lists held 230 MB."""

    def __init__(self, column: pa.ChunkedArray):
        self.array = column.combine_chunks()

    def __getitem__(self, i: int) -> str | None:
        return self.array[int(i)].as_py()

    def __len__(self) -> int:
        return len(self.array)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Strings) and self.array.equals(other.array)


class IndexRows:
    """The index columns replay needs of a store, per image (keys, hashes, status, recorded size) and per view
    (crop boxes), from its checked consolidated index (`Store.images`), read in place: ~30 bytes a view."""

    def __init__(self, store: Store):
        from ..store.consolidated import decodable

        self.table, self.views = store.images, store.views
        self.valid = decodable(self.table)

    # each decoded on first use: a replay of stored targets or stored views needs none (300 MB at ImageNet size)
    @cached_property
    def keys(self) -> Strings:
        return Strings(self.table.column("key"))

    @cached_property
    def shas(self) -> Strings:
        return Strings(self.table.column("image_sha256"))

    @cached_property
    def params(self) -> dict[str, np.ndarray]:
        return {c: self.table.column(c).combine_chunks().flatten().to_numpy(zero_copy_only=False)
                for c in PARAMS if not c.startswith("orig_")}

    @cached_property
    def sizes(self) -> dict[str, np.ndarray]:
        return {c: self.table.column(c).to_numpy() for c in PARAMS if c.startswith("orig_")}

    def row(self, i: int, v: int) -> dict[str, Any]:
        """What ViewBuilder.stored_view needs of view v of image i."""
        r = i * self.views + v
        return ({c: a[r].item() for c, a in self.params.items()} | {c: a[i].item() for c, a in self.sizes.items()}
                | {"image_sha256": self.shas[i]})

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, IndexRows) and other.keys == self.keys and other.shas == self.shas
                and np.array_equal(other.valid, self.valid)
                and all(np.array_equal(other.params[c], self.params[c]) for c in self.params)
                and all(np.array_equal(other.sizes[c], self.sizes[c]) for c in self.sizes))


class StoredViews(Dataset):
    """Map-style replay by (image_idx, view) from zarr stores of one plan and one image set: x uint8 [3,H,W] once,
    and {teacher: target} as stored.

    Each target is [*target_shape] in its store's dtype, with {teacher: scales} [*target_shape[:-1]] for int8: the
    training process dequantizes them (`Replay.targets`), so no float32 target crosses the DataLoader. `readers`
    ({teacher: TargetReader}) read a teacher's targets instead of its store. The first store's index gives the
    crops; the stores' index rows (keys, image hashes, status, crop boxes) must agree, else one line names the store.

    Without a source (targets only: benchmarks, or a loop that crops the images itself) items carry no x, unless
    `stored_pixels`: then x is the first store's own student view, decoded in this (worker) process.
    """

    def __init__(self, stores: Mapping[str, Store], source: ImageSource | None, student_tf: ViewTransform | None,
                 strict: bool = False, readers: Mapping[str, TargetReader] | None = None,
                 stored_pixels: bool = False, encoded: bool = False):
        self.stores = dict(stores)
        self.names = list(self.stores)
        first = self.stores[self.names[0]]
        self.readers = {n: (readers or {}).get(n, st) for n, st in self.stores.items()}
        self.rows = IndexRows(first)
        for n in self.names[1:]:
            if IndexRows(self.stores[n]) != self.rows:
                raise FdpipeError(f"{self.stores[n].url}: its index rows (keys, image hashes, status or crop boxes) "
                                  f"differ from {first.url}'s; the stores of several teachers must come from one "
                                  "plan over the same images")
        self.views, self.num_images, self.valid = first.views, first.num_images, self.rows.valid
        self.builder = ViewBuilder(source, first.plan, student_tf, strict=strict) if source is not None else None
        self.pixels = StoredPixels(first, encoded) if stored_pixels else None

    def __len__(self) -> int:
        return self.num_images

    def view(self, i: int, v: int) -> torch.Tensor:
        return self.builder.stored_view(self.rows.keys[i], v, self.rows.row(i, v))

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> list[dict[str, Any]]:
        return unbatch(self.batch(items), len(items))

    def batch(self, pairs: list[tuple[int, int]]) -> dict[str, Any]:
        """A whole batch, collated: each teacher's targets are one read of its store into one array, which is handed
        over as it is (no per-sample tensors for the DataLoader to stack again: at CLIP-L shape that copy was a tenth
        of the replay's CPU time)."""
        pairs = [(int(i), int(v)) for i, v in pairs]
        out: dict[str, Any] = {"target": {}, "image_idx": torch.tensor([i for i, _ in pairs]),
                               "view": torch.tensor([v for _, v in pairs])}
        scales = {}
        for n, reader in self.readers.items():
            values, s = reader.stored_targets(pairs)
            out["target"][n] = torch.from_numpy(values)
            if s is not None:
                scales[n] = torch.from_numpy(s)
        if scales:
            out["scales"] = scales
        if self.pixels is not None:
            data = self.stores[self.names[0]].stored_student_views(pairs)
            if self.pixels.encoded:  # bytes cross the loader; `Replay.inputs` decodes them on the device
                out["x_encoded"] = self.pixels.encoded_batch(data, pairs, self.rows.keys)
            else:
                out["x"] = self.pixels.decode_batch(data, [i for i, _ in pairs], [v for _, v in pairs],
                                                    self.rows.keys, "cpu")
        elif self.builder is not None:
            out["x"] = torch.stack([self.view(i, v) for i, v in pairs])
        return out


def unbatch(batch: dict[str, Any], n: int) -> list[dict[str, Any]]:
    """The n samples of a collated batch (ids as ints, as a Dataset item has them)."""
    def item(v: Any, j: int) -> Any:
        return {k: item(x, j) for k, x in v.items()} if isinstance(v, dict) else v[j]

    return [{k: int(v[j]) if k in ("image_idx", "view") else item(v, j) for k, v in batch.items()} for j in range(n)]


class LiveViews(Dataset):
    """Map-style replay for online mode: the same views, with {teacher: input} instead of stored targets."""

    def __init__(self, source: ImageSource, plan: AugmentationPlan, student_tf: ViewTransform,
                 teacher_tf: Mapping[str, ViewTransform], view_codec: Any = None):
        self.builder = ViewBuilder(source, plan, student_tf, dict(teacher_tf))
        self.codec = view_codec  # StudentViews: the student's pixels as a store of them would give them
        self.keys = source.keys
        self.valid = np.ones(len(source), dtype=bool)

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, item: tuple[int, int]) -> dict[str, Any]:
        i, v = int(item[0]), int(item[1])
        x, tx = self.builder.live_views(self.keys[i], v)
        return {"x": x if self.codec is None else self.codec.roundtrip(x), "teacher_x": tx, "image_idx": i, "view": v}


class EpochSampler(torch.utils.data.Sampler):
    """This rank's (image_idx, view) pairs of one epoch, from `start` on; a pure function of its arguments.

    `pairs` is one int32 array [n, 2], made by array operations (at ImageNet's 1.28M images a list of tuples took
    2.4 s and 176 MB each epoch, and a resume at 90% built all of it to drop 90%)."""

    def __init__(self, valid: np.ndarray, views: int, seed: int, epoch: int, rank: int = 0, world: int = 1,
                 start: int = 0, fresh: bool = False):
        ids = np.flatnonzero(valid)
        mine = epoch_samples(seed, epoch, len(ids), views, rank, world)[start:, 0]
        chosen = fresh_views(epoch, len(valid)) if fresh else epoch_views(seed, epoch, len(valid), views)
        images = ids[mine]
        self.pairs = np.stack([images, chosen[images]], axis=1).astype(np.int32)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(map(tuple, self.pairs.tolist()))

    def __len__(self) -> int:
        return len(self.pairs)


def samples_per_epoch(valid: np.ndarray, world: int = 1) -> int:
    n = int(valid.sum())
    return (n - n % world) // world if world > 1 else n



class StreamedViews(IterableDataset):
    """Streaming replay from wds stores of one plan, one image set and one shard size: shard shuffle, then a seeded
    sample buffer; one view per image, the same view for every image of a shard in an epoch (`shard_views`), so an
    epoch reads one view's tar per shard. Items are whole batches of `batch_size` (the DataLoader hands them on as
    they are), each carrying {teacher: targets [B, ...]}; a worker's last, partial batch is dropped.

    Rank r takes every world-th shard of the epoch's shard order, each DataLoader worker every num_workers-th of
    those. Everything is a pure function of (seed, epoch, rank, worker), so a resume replays the same stream.

    `start` (a multiple of `batch_size`): the samples of this rank's epoch already trained on. The buffer's order
    depends only on how many samples a worker streams, and the loader interleaves its workers' batches round-robin,
    so which samples those were is known from the index: they are neither read nor decoded, and worker k takes up
    the stream of the worker whose turn came next (`round_robin_resume`), so the batches continue as they were.

    The order is computed from the index alone, so a store whose index records each sample's byte range (format 8,
    local: `Store.reads_ranges`) reads each batch's samples straight into one array, as a zarr replay does; other
    stores stream their tars front to back (`stream`) and give the same batches.

    Every store streams the same (image_idx, view) sequence (the same shard order, view per shard and buffer order,
    a function of the sample count); each sample's pair is checked to agree, and the first store's crops the
    student's view.
    """

    def __init__(self, stores: Mapping[str, Store], source: ImageSource | None, student_tf: ViewTransform | None,
                 seed: int, epoch: int, rank: int = 0, world: int = 1, buffer: int = 256, strict: bool = False,
                 start: int = 0, batch_size: int = 1, stored_pixels: bool = False):
        self.stores = dict(stores)
        self.names = list(self.stores)
        self.store = self.stores[self.names[0]]
        self.seed, self.epoch, self.rank, self.world, self.buffer = seed, epoch, rank, world, buffer
        self.start, self.batch_size = start, batch_size
        self.builder = ViewBuilder(source, self.store.plan, student_tf, strict=strict) if source is not None else None
        self.pixels = StoredPixels(self.store) if stored_pixels else None

    def __len__(self) -> int:
        """Samples every rank yields in this epoch: the smallest rank's count of decodable images.

        Ranks hold different shards each epoch, so their counts differ from epoch to epoch; all of them stop at the
        same step, so none waits in a collective for a rank that ran out.
        """
        ok = self.store.decodable_per_shard
        order = shard_order(self.seed, self.epoch, self.store.num_shards)
        return min(int(sum(ok[int(s)] for s in order[r:: self.world])) for r in range(self.world))

    def plan(self, store: Store, wid: int, nw: int) -> tuple[list[int], np.ndarray, list[int], int]:
        """Loader worker `wid` of `nw`'s stream: its shards in order, the view of every shard, the buffer's order
        of the stream's positions (each a decodable image of those shards, in order) and how many of them the
        epoch already trained on."""
        rank_shards = [int(s) for s in shard_order(self.seed, self.epoch, store.num_shards)[self.rank:: self.world]]
        ok = store.decodable
        counts = [int(sum(ok[s].sum() for s in rank_shards[w::nw])) for w in range(nw)]
        delivered, turn = round_robin_resume([c // self.batch_size for c in counts], self.start // self.batch_size)
        worker = (turn + wid) % nw  # the stream this loader worker continues
        chosen = shard_views(self.seed, self.epoch, store.num_shards, store.views)
        order = buffer_order(counts[worker], self.seed, self.epoch, self.buffer, stream=f"{self.rank}/{worker}")
        return rank_shards[worker::nw], chosen, order, delivered[worker] * self.batch_size

    def stream(self, store: Store, wid: int, nw: int) -> Iterator[StoredView]:
        """One store's views for loader worker `wid` of `nw`, in training order, from `start` on, its tars read
        front to back (a store of format 7 or earlier, or a remote one)."""
        shards, chosen, order, done = self.plan(store, wid, nw)
        ok = store.decodable
        trained = set(order[:done])

        def views():  # (position in this worker's stream, view) of every decodable image still to train on
            pos = 0
            for shard in shards:
                decodable = np.flatnonzero(ok[shard])
                positions = range(pos, pos + len(decodable))
                skip = frozenset(int(j) for j, p in zip(decodable, positions) if p in trained)
                skip |= frozenset(int(j) for j in np.flatnonzero(~ok[shard]))  # failed images: never replayed
                pos += len(decodable)
                if len(skip) == len(ok[shard]):  # nothing of it left to train on: its tar is not opened
                    continue
                kept = (p for p in positions if p not in trained)
                for it in store.iter_view(shard, int(chosen[shard]), skip):
                    if it.row["status"] == "ok":
                        yield next(kept), it

        arrived: dict[int, StoredView] = {}
        items = views()
        for p in order[done:]:
            while p not in arrived:
                got = next(items, None)
                if got is None:
                    raise FdpipeError(f"{store.url}: the shards {shards} hold fewer decodable samples than the "
                                      "index says; the store is damaged (run `fdpipe store verify --deep`)")
                arrived[got[0]] = got[1]
            yield arrived.pop(p)

    def ranged(self, wid: int, nw: int) -> Iterator[dict[str, Any]]:
        """Loader worker `wid` of `nw`'s batches, each sample of every store read by its byte range (`stream`'s
        order, from the index alone)."""
        shards, chosen, order, done = self.plan(self.store, wid, nw)
        ok = self.store.decodable
        for n in self.names[1:]:
            if not all(np.array_equal(a, b) for a, b in zip(self.stores[n].decodable, ok)):
                raise FdpipeError(f"{self.stores[n].url}: its decodable images differ from {self.store.url}'s; the wds "
                                  "stores of several teachers must share the plan, the images and the shard size")
        shard_of = np.repeat(np.asarray(shards, np.int64), [int(ok[s].sum()) for s in shards])
        in_shard = np.concatenate([np.flatnonzero(ok[s]) for s in shards] or [np.zeros(0, np.int64)])
        todo = np.asarray(order[done:], np.int64)
        size, b = self.store.shard_size, self.batch_size
        for first in range(0, len(todo) - b + 1, b):
            at = todo[first:first + b]
            items = [(int(s), int(chosen[s]), int(j)) for s, j in zip(shard_of[at], in_shard[at])]
            batch: dict[str, Any] = {"target": {}, "image_idx": torch.from_numpy(shard_of[at] * size + in_shard[at]),
                                     "view": torch.from_numpy(chosen[shard_of[at]].astype(np.int64))}
            scales, student = {}, None
            for n in self.names:
                values, s, views = self.stores[n].read_samples(items)
                batch["target"][n] = torch.from_numpy(values)
                if s is not None:
                    scales[n] = torch.from_numpy(s)
                student = views if n == self.names[0] else student
            if scales:
                batch["scales"] = scales
            self._pixels(batch, student, items)
            yield batch

    def _pixels(self, batch: dict[str, Any], student: list[bytes] | None, items: list[tuple[int, int, int]],
                rows: list[dict[str, Any]] | None = None) -> None:
        """The batch's x: the stored student views decoded, or the source's crops (`rows`: the samples' index
        rows, else read from the index parts)."""
        if self.pixels is None and self.builder is None:
            return
        idx, views = batch["image_idx"].tolist(), batch["view"].tolist()
        if self.pixels is not None:
            keys = _Keys(self.store, items, idx) if rows is None else {i: r["key"] for i, r in zip(idx, rows)}
            batch["x"] = self.pixels.decode_batch(student, idx, views, keys, "cpu")
            return
        if rows is None:
            rows = [self._rows_of(s)[j * self.store.views + v] for s, v, j in items]
        batch["x"] = torch.stack([self.builder.stored_view(r["key"], v, r) for r, v in zip(rows, views)])

    def _rows_of(self, shard: int) -> list[dict[str, Any]]:
        """A shard's index rows, read once while its samples are being trained on (the last `ROWS_KEPT` shards)."""
        kept = self.__dict__.setdefault("_rows", {})
        if shard not in kept:
            if len(kept) >= self.ROWS_KEPT:
                kept.pop(next(iter(kept)))
            kept[shard] = self.store.index_part(shard).to_pylist()
        return kept[shard]

    ROWS_KEPT = 8  # shards a sample buffer spans at once, with room to spare

    def streamed(self, wid: int, nw: int) -> Iterator[dict[str, Any]]:
        """Loader worker `wid` of `nw`'s batches from its tars, streamed (`stream`), each sample's (image_idx, view)
        checked to agree across the stores."""
        streams = {n: self.stream(st, wid, nw) for n, st in self.stores.items()}
        first = self.names[0]
        group: list[dict[str, StoredView]] = []
        for it in streams[first]:
            v = int(it.row["view"])
            sample = {first: it}
            for n in self.names[1:]:
                got = next(streams[n], None)
                if got is None or (got.image_idx, int(got.row["view"])) != (it.image_idx, v):
                    what = "nothing" if got is None else f"image {got.image_idx} view {int(got.row['view'])}"
                    raise FdpipeError(f"{self.stores[n].url} streams {what} where {self.store.url} streams image "
                                      f"{it.image_idx} view {v}; the wds stores of several teachers must share the "
                                      "plan, the images and the shard size")
                sample[n] = got
            group.append(sample)
            if len(group) == self.batch_size:
                yield self._collate(group)
                group = []
        for n in self.names[1:]:
            if next(streams[n], None) is not None:
                raise FdpipeError(f"{self.stores[n].url} streams more samples than {self.store.url}; the wds stores "
                                  "of several teachers must share the plan, the images and the shard size")

    def _collate(self, group: list[dict[str, StoredView]]) -> dict[str, Any]:
        firsts = [g[self.names[0]] for g in group]
        batch: dict[str, Any] = {
            "target": {n: torch.from_numpy(np.stack([g[n].values for g in group])) for n in self.names},
            "image_idx": torch.tensor([it.image_idx for it in firsts], dtype=torch.int64),
            "view": torch.tensor([int(it.row["view"]) for it in firsts], dtype=torch.int64)}
        scales = {n: torch.from_numpy(np.stack([g[n].scales for g in group])) for n in self.names
                  if group[0][n].scales is not None}
        if scales:
            batch["scales"] = scales
        self._pixels(batch, [it.student_view for it in firsts], [], rows=[it.row for it in firsts])
        return batch

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        fast = all(st.reads_ranges for st in self.stores.values())
        return self.ranged(wid, nw) if fast else self.streamed(wid, nw)


class _Keys:
    """keys[image_idx] of a batch's images, for messages: read from the index only when one is asked for."""

    def __init__(self, store: Store, items: list[tuple[int, int, int]], idx: list[int]):
        self.store, self.at = store, dict(zip(idx, items))

    def __getitem__(self, i: int) -> str:
        s, v, j = self.at[i]
        return self.store.index_part(s, ["key"]).column("key")[j * self.store.views + v].as_py()
