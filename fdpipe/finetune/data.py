"""Labelled data for fine-tuning: label-scarce selection, the held-out split, seeded augmentation, epoch order.

Every random choice is a pure function of (seed, epoch, image): which images a label-scarce run keeps, the order an
epoch visits them, and each image's augmentation (the transform runs under a private seed, not the process RNG).
So DataLoader workers, DDP ranks and a resume all see the same samples, whatever the worker count.
"""

from __future__ import annotations

import random
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from ..data import ImageError, ImageSource, decode_rgb, open_source
from ..replay import epoch_permutation
from ..errors import FdpipeError
from ..seeds import derive_seed, seeded_rng

RANDAUG = "rand-m9-mstd0.5-inc1"  # BEiT / FD fine-tuning's RandAugment policy


def item_seed(seed: int, epoch: int, index: int) -> int:
    """64-bit seed of one image's augmentation in one epoch."""
    return derive_seed(seed, epoch, index, "aug")


def labelled(labels: Sequence[int | None], spec: str) -> np.ndarray:
    """Labels as an int64 array; refuses a source with unlabelled images (fine-tuning needs every label)."""
    missing = sum(1 for v in labels if v is None)
    if missing:
        raise FdpipeError(f"{missing} of {len(labels)} images in {spec} have no label; fine-tuning needs labelled "
                          "data (class subfolders, a 'label' column, or a wds 'cls' member)")
    return np.asarray(labels, dtype=np.int64)


def select_indices(labels: np.ndarray, seed: int, per_class: int | None = None, limit: int | None = None,
                   candidates: np.ndarray | None = None, num_classes: int | None = None,
                   class_names: Sequence[str] | None = None) -> np.ndarray:
    """The training images of a label-scarce run, in ascending order.

    Images are visited in one seeded order (a function of ``seed`` only); ``per_class`` keeps the first K of each
    class in that order, then ``limit`` keeps the first N of what is left, in the same order. With neither, all
    ``candidates`` (default: every image) are kept. A class with fewer than K images is an error, not a silent
    imbalance.
    """
    pool = np.arange(len(labels)) if candidates is None else np.asarray(candidates, dtype=np.int64)
    if per_class is None and limit is None:
        return np.sort(pool)
    order = pool[seeded_rng(seed, 0, "labelled-subset").permutation(len(pool))]
    if per_class is not None:
        k = num_classes if num_classes is not None else int(labels.max()) + 1
        counts = np.bincount(labels[pool], minlength=k)
        c = int(counts.argmin())
        if counts[c] < per_class:
            name = f" ({class_names[c]})" if class_names is not None and c < len(class_names) else ""
            if counts[c] == 0:
                raise FdpipeError(f"--labels-per-class {per_class}: class {c}{name} has no images in the training "
                                  "data; check the data or --num-classes")
            raise FdpipeError(f"--labels-per-class {per_class} is more than available: class {c}{name} has only "
                              f"{counts[c]} images; use --labels-per-class {counts[c]} or less")
        taken = np.zeros(k, dtype=np.int64)
        keep = []
        for i in order.tolist():
            y = labels[i]
            if taken[y] < per_class:
                taken[y] += 1
                keep.append(i)
        order = np.asarray(keep, dtype=np.int64)
    if limit is not None:
        order = order[:limit]
    return np.sort(order)


def default_val_spec(train_spec: str) -> str | None:
    """The builtin held-out split of a builtin training set (fashion-mnist -> fashion-mnist:test); else None."""
    if train_spec in ("fashion-mnist", "fashion-mnist:train"):
        return "fashion-mnist:test"
    return None


def open_val(val: str | None, train_spec: str, storage_options: dict | None = None) -> ImageSource:
    spec = val or default_val_spec(train_spec)
    if spec is None:
        raise FdpipeError(f"no held-out split for {train_spec}: pass --val SRC (a folder, shards or list of labelled "
                          "images the model does not train on)")
    return open_source(spec, split="test", storage_options=storage_options)


def check_val_classes(train: ImageSource, val: ImageSource, val_labels: np.ndarray, num_classes: int) -> None:
    """The held-out labels must mean the same classes as the training labels."""
    if train.classes is not None and val.classes is not None and list(train.classes) != list(val.classes):
        raise FdpipeError(f"--val {val.spec} has classes {list(val.classes)[:5]}... but --data has "
                          f"{list(train.classes)[:5]}...; use a held-out split with the same class folders")
    if len(val_labels) and int(val_labels.max()) >= num_classes:
        raise FdpipeError(f"--val {val.spec} has label {int(val_labels.max())} but the model has {num_classes} "
                          "classes; use a held-out split of the same task")


def _posterize(img, bits_to_keep: int, **_: Any):
    """timm's posterize, with 0 bits kept meaning a black image as Pillow < 10 and TF's RandAugment have it.

    The increasing policy ('inc1') keeps 4 - int(m / 10 * 4) bits, 0 at magnitude 10, which magnitude noise
    (mstd0.5 around m9) reaches; newer Pillow raises on 0 instead of returning black.
    """
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(data_config: dict[str, Any], image_size: int, randaug: bool, min_crop: float = 0.08,
                    reprob: float = 0.0) -> Callable:
    """timm's training transform: RandomResizedCrop (min_crop-1) + flip, RandAugment when on, no colour jitter, then
    random erasing with probability reprob (FD's and DeiT's: one box of per-pixel normal noise)."""
    from timm.data import create_transform
    from timm.data.auto_augment import RandAugment

    tf = create_transform(
        input_size=image_size, is_training=True, scale=(min_crop, 1.0), hflip=0.5, color_jitter=None,
        auto_augment=RANDAUG if randaug else None, interpolation=data_config.get("interpolation", "bicubic"),
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]), re_prob=reprob,
        re_mode="pixel", re_count=1)
    for t in getattr(tf, "transforms", []):
        if isinstance(t, RandAugment):
            for op in t.ops:
                if op.name.startswith("Posterize"):
                    op.aug_fn = _posterize
    return tf


def eval_transform(data_config: dict[str, Any], image_size: int) -> Callable:
    """timm's evaluation transform: resize to size / crop_pct, centre crop, normalize."""
    from timm.data import create_transform

    return create_transform(
        input_size=image_size, is_training=False, interpolation=data_config.get("interpolation", "bicubic"),
        mean=tuple(data_config["mean"]), std=tuple(data_config["std"]),
        crop_pct=float(data_config.get("crop_pct") or 0.875))


class Labelled(Dataset):
    """(x, label) of a source image; items are (index, epoch) pairs, augmented under a private seed.

    The python, numpy and torch RNGs are seeded from (seed, epoch, index) around the transform and restored after,
    so an image's augmentation does not depend on the worker, the rank, or what ran before (a resume).
    """

    def __init__(self, source: ImageSource, labels: np.ndarray, transform: Callable, seed: int = 0):
        self.source, self.labels, self.transform, self.seed = source, labels, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int] | int) -> tuple[torch.Tensor, int]:
        index, epoch = (int(item[0]), int(item[1])) if isinstance(item, tuple) else (int(item), 0)
        sample = self.source[index]
        try:
            image = decode_rgb(sample.data)
        except ImageError as e:
            raise FdpipeError(f"image {sample.key!r} of {self.source.spec}: {e}") from None
        s = item_seed(self.seed, epoch, index)
        py_state, np_state = random.getstate(), np.random.get_state()
        random.seed(s)  # timm's crops and RandAugment ops draw from random, its op choice from numpy
        np.random.seed(s % 2**32)
        try:
            with torch.random.fork_rng(devices=[]):
                # the CPU generator only: torch.manual_seed also queues CUDA seeding, with a 1 ms stack capture
                torch.random.default_generator.manual_seed(s % 2**63)
                x = self.transform(image)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return x, int(self.labels[index])


class EpochOrder(Sampler):
    """This rank's (index, epoch) items of one epoch, from ``start`` on: a strided slice of a seeded permutation.

    The permutation is cut to a multiple of ``world`` so every rank takes the same number of steps.
    """

    def __init__(self, indices: np.ndarray, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0):
        perm = np.asarray(indices)[epoch_permutation(seed, epoch, len(indices))]
        perm = perm[: len(perm) - len(perm) % world] if world > 1 else perm
        self.items = [(int(i), epoch) for i in perm[rank::world]][start:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)


def per_rank(n: int, world: int) -> int:
    return (n - n % world) // world if world > 1 else n
