"""The images analyze looks at, each as one view: the largest centred square, in every model's own transform.

Each image is seen as one view: the largest centred square (the whole image when it is square), resized to the
model's input size with its own interpolation and normalised with its own mean and std, through the same
``ViewTransform`` every fdpipe consumer uses. Analysis runs in float32 in eval mode; attention comes from timm's own
modules (``capture_attention``), so the relative position bias enters as the model applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..augment import AugParams, ViewTransform
from ..errors import FdpipeError


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


def image_batches(images: Images, transform: ViewTransform, batch_size: int):
    """The images as batches of `transform`ed tensors, in order (diagnostics and the landscape read them alike)."""
    for start in range(0, len(images.images), batch_size):
        chunk = images.images[start:start + batch_size]
        yield torch.stack([transform(im, centre_square(im.height, im.width)) for im in chunk])
