"""Decoding and cropping in DataLoader workers: one item is one image with all of its V views.

Workers do the CPU work (decode, RGB conversion, parameter sampling, crop, resize, and with --student-views the
student's crops and their encoding) so the main process only batches,
normalizes on the teacher's device and runs the teacher. Views cross as uint8, a quarter of float32's bytes, as
timm's PrefetchLoader has them. An image that fails to decode comes back with its error instead of views, and its
rows stay in the index.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ..augment import AugmentationPlan, ViewTransform
from ..data import ImageError, ImageSource, decode_rgb, encoded_image, image_sha256
from ..viewcodec import StudentViews


@dataclass
class ImageViews:
    image_idx: int
    key: str
    label: int | None
    pixels: list[torch.Tensor] | None  # per view geometry, the V views uint8 [V, 3, H, W] (channels-last memory:
    # stack_views); None when it failed
    rows: list[dict[str, Any]]  # V index rows (without `shard`)
    embed: tuple[str, bytes] | None = None
    student_views: list[bytes] | None = None  # the V encoded student views (b"" each for a failed image)


class PlanViews(Dataset):
    """Image i of `source` -> all V views of the plan, for each of the models' view geometries: the image is decoded
    and each view's crop box sampled once, then every geometry (size, interpolation) resizes the same crops. Teachers
    that differ only in mean and std share one geometry: each normalizes the same uint8 views its own way
    (`ViewTransform.normalize`, on its device)."""

    def __init__(self, source: ImageSource, plan: AugmentationPlan, transforms: list[ViewTransform],
                 embed: bool = False, student: StudentViews | None = None):
        self.source, self.plan, self.transforms, self.embed = source, plan, list(transforms), embed
        self.student = student  # encode each view's student pixels too (--student-views)
        self.student_tf = None if student is None else student.transform()
        # a teacher geometry that is the student's: its pixels are the student view, resized once
        self.student_geometry = None if student is None else next(
            (g for g, tf in enumerate(self.transforms) if student.matches(tf.size, tf.interpolation)), None)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> ImageViews:
        key, label = self.source.keys[i], self.source.labels[i]
        base = dict(image_idx=i, key=key, source=self.source.location(i), label=label)
        try:
            sample = self.source[i]
            sha = image_sha256(sample)
            image = decode_rgb(sample.data)
        except ImageError as e:
            rows = [dict(base, view=v, seed=self.plan.view_seed(key, v), status="error", error=str(e))
                    for v in range(self.plan.views)]
            return ImageViews(i, key, label, None, rows,
                              student_views=None if self.student is None else [b""] * self.plan.views)
        h, w = image.height, image.width
        seeds = [self.plan.view_seed(key, v) for v in range(self.plan.views)]
        params = [self.plan.sample_seeded(s, (h, w)) for s in seeds]
        rows = [dict(base, view=v, seed=s, **p.to_dict(), orig_height=h, orig_width=w, image_sha256=sha,
                     status="ok") for v, (s, p) in enumerate(zip(seeds, params))]
        cut = self.plan.prepare(image)  # once per image: every view and every teacher's transform cuts from it
        views = [[tf.pixels(cut, p) for p in params] for tf in self.transforms]
        return ImageViews(i, key, label, [stack_views(v) for v in views], rows,
                          encoded_image(sample.data) if self.embed else None, self.student_views(cut, params, views))

    def student_views(self, cut: Any, params: list[Any], views: list[list[torch.Tensor]]) -> list[bytes] | None:
        """The V encoded student views: crop, resize to the student's size, flip, encode (in this worker). Each is
        encoded as `pixels` cut it, in [H, W, 3] memory, before a stack reorders the teacher's batch."""
        if self.student is None:
            return None
        if self.student_geometry is not None:
            own = views[self.student_geometry]
        else:
            own = [self.student_tf.pixels(cut, p) for p in params]
        return [self.student.encode(v) for v in own]


def stack_views(views: list[torch.Tensor]) -> torch.Tensor:
    """uint8 [V, 3, H, W] of the views, in channels-last memory: each view as `pixels` cut it ([H, W, 3] memory)
    copied once, in order. Stacking them channels-first reordered every byte on the CPU (0.3 ms a 224 px view, an
    eighth of extraction's data path); `on_teacher` makes the batch contiguous on the teacher's device instead."""
    return torch.stack([v.permute(1, 2, 0) for v in views]).permute(0, 3, 1, 2)


def collate(items: list[ImageViews]) -> list[ImageViews]:
    return items


def geometries(transforms: list[ViewTransform]) -> tuple[list[ViewTransform], list[int]]:
    """The distinct view geometries of the models' transforms (what PlanViews resizes to) and, per transform, the
    index of its geometry: two teachers at 224 px bicubic share one resize whatever their mean and std."""
    shapes: list[tuple[Any, str]] = []
    first: list[ViewTransform] = []
    which = []
    for tf in transforms:
        shape = (tf.size, tf.interpolation)
        if shape not in shapes:
            shapes.append(shape)
            first.append(tf)
        which.append(shapes.index(shape))
    return first, which



def host_views(items: list[ImageViews], geometry: int) -> torch.Tensor:
    """uint8 [sum of V, 3, H, W] on the host: the items' views of one geometry, as one batch (channels-last
    memory, as `stack_views` made each)."""
    return torch.cat([it.pixels[geometry] for it in items])


def on_teacher(views: torch.Tensor, transform: ViewTransform, device: torch.device | str) -> torch.Tensor:
    """A host batch of uint8 views as the teacher's float32 input on `device`, contiguous (channels first) and
    normalized there: the teacher sees the tensor it saw before `stack_views`, value for value and stride for
    stride."""
    return transform.normalize(views.to(device, non_blocking=True).contiguous())


def teacher_inputs(items: list[ImageViews], geometry: int, transform: ViewTransform,
                   device: torch.device | str) -> torch.Tensor:
    """float32 [sum of V, 3, H, W] on `device`: the items' uint8 views of one geometry, normalized there."""
    return on_teacher(host_views(items, geometry), transform, device)
