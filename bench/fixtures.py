"""Benchmark data: photos, teacher weights, and small stores built straight through fdpipe's StoreWriter, or
held in memory in place of a store."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch


def make_photos(folder: Path, n: int, sizes: tuple[int, int] = (192, 384), seed: int = 0, fmt_: str = "jpg") -> Path:
    """n photo crops of skimage's bundled pictures (random sizes in `sizes`), JPEG like ImageNet, two class folders."""
    from PIL import Image
    from skimage import data

    pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    rng = np.random.default_rng(seed)
    for i in range(n):
        cls = folder / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        pic = pics[i % len(pics)]
        h = int(min(pic.shape[0], rng.integers(sizes[0], sizes[1] + 1)))
        w = int(min(pic.shape[1], rng.integers(sizes[0], sizes[1] + 1)))
        y, x = int(rng.integers(0, pic.shape[0] - h + 1)), int(rng.integers(0, pic.shape[1] - w + 1))
        im = Image.fromarray(pic[y:y + h, x:x + w])
        if fmt_ == "jpg":
            im.save(cls / f"img{i:06d}.jpg", quality=90)
        else:
            im.save(cls / f"img{i:06d}.png")
    return folder


def teacher_weights(name: str, image_size: int | None, work: Path) -> str | None:
    """None when fdpipe finds the teacher's weights offline (effnet-lite0); else random weights saved as a timm
    state dict (fine for speed: FLOPs do not depend on the values)."""
    import timm

    from fdpipe.models import resolve_teacher_name

    timm_name = resolve_teacher_name(name)
    arch, tag = timm.models.split_model_name_tag(timm_name)
    if arch == "tf_efficientnet_lite0" and not tag:
        from fdpipe.models.weights import lite0_package_file

        if lite0_package_file() is not None:
            return None
    path = work / f"random-{arch}-{image_size}.pth"
    if not path.exists():
        kw = {"img_size": image_size} if image_size else {}
        try:
            model = timm.create_model(arch, pretrained=False, **kw)
        except TypeError:
            model = timm.create_model(arch, pretrained=False)
        torch.save(model.state_dict(), path)
    return str(path)


def whitened(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape, dtype=np.float32)
    x -= x.mean(-1, keepdims=True)
    x /= np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    return x


def image_rows(source, plan, i: int) -> list[dict[str, Any]]:
    """The V index rows extraction would write for image i of `source` (real crop params and sha256)."""
    from fdpipe.data import decode_rgb, image_sha256

    key = source.keys[i]
    sample = source[i]
    sha = image_sha256(sample)
    image = decode_rgb(sample.data)
    h, w = image.height, image.width
    return [dict(image_idx=i, key=key, source=source.location(i), label=source.labels[i], view=v,
                 seed=plan.view_seed(key, v), **plan.sample(key, v, (h, w)).to_dict(), orig_height=h, orig_width=w,
                 image_sha256=sha, status="ok") for v in range(plan.views)]


def synthetic_settings(data_spec: str, n: int, views: int, grid: int, prefix: int, channels: int, dtype: str,
                       layout: str, shard_size: int, limit: int | None = None, seed: int = 0):
    """Store settings as extract builds them, for a teacher with a grid x grid map, `prefix` tokens and C channels."""
    from fdpipe.augment import AugmentationPlan
    from fdpipe.models import WHITENING
    from fdpipe.store.contract import StoreSettings, TeacherInfo

    info = TeacherInfo(alias="synthetic", timm_name="synthetic", tokens=grid * grid + prefix, channels=channels,
                       grid=(grid, grid), num_prefix_tokens=prefix, weights_sha256="0" * 64, layer=None,
                       target="features", pretrained_cfg={}, image_size=grid * 16)
    return StoreSettings.create(layout=layout, dtype=dtype, teacher=info, plan=AugmentationPlan(seed=seed, views=views),
                                num_images=n, views=views, shard_size=shard_size, whitening=WHITENING,
                                data={"spec": data_spec, "limit": limit})


def build_store(url: str | Path, settings, source,
                targets: Callable[[int, int], np.ndarray], rows_cache: dict[int, list] | None = None) -> None:
    """Write a complete store through fdpipe's StoreWriter: targets(a, b) gives float32 [b-a, V, T, C]."""
    from fdpipe.store import StoreWriter, shard_range

    plan = settings.plan
    w = StoreWriter(str(url), settings)
    done = w.open()
    for shard in range(w.num_shards):
        if shard in done:
            continue
        a, b = shard_range(shard, w.s, w.n)
        rows = []
        for i in range(a, b):
            if rows_cache is not None and i in rows_cache:
                rows += rows_cache[i]
            else:
                r = image_rows(source, plan, i)
                if rows_cache is not None:
                    rows_cache[i] = r
                rows += r
        w.write_stored(shard, *w.q.quantize(targets(a, b)), rows)
    if not w.try_finalize():
        raise RuntimeError(f"store {url} did not finalize")


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


class MemoryTargets:
    """A target reader (`fdpipe.replay.TargetReader`) whose targets come from arrays in memory, passed to
    `open_replay(store, ..., targets=)` or `distill(cfg, targets={url: reader})` in place of the store's reads.

    values [N, V, *target_shape] in any dtype the store's quantizer undoes (the stored one, or float32), with int8
    scales [N, V, *target_shape[:-1]] or None: the training process dequantizes them as it does a store's.
    """

    def __init__(self, values: np.ndarray, scales: np.ndarray | None = None):
        self._values, self._scales = values, scales

    def stored_targets(self, pairs: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray | None]:
        i, v = np.asarray(pairs).T
        return self._values[i, v], None if self._scales is None else self._scales[i, v]


def load_stored(store) -> tuple[np.ndarray, np.ndarray | None]:
    """Every target of a store exactly as stored: values [N, V, *target_shape] and int8 scales (or None)."""
    q = store.quantizer
    values = np.empty((store.num_images, store.views, *store.target_shape), q.dtype)
    scales = np.empty((store.num_images, store.views, *store.target_shape[:-1]), np.float16) if q.has_scales else None
    for it in store.iter_stored():
        values[it.image_idx] = it.values
        if scales is not None:
            scales[it.image_idx] = it.scales
    return values, scales


def targets_in_memory(store_url: str | None = None, array: np.ndarray | None = None) -> MemoryTargets:
    """A reader handing out targets from memory instead of reading the store: `array` (float32 [N, V, T, C]) when
    given, else every target of `store_url` as stored, loaded up front. The caller passes it in (`targets=`); the
    same distill loop runs unchanged, and DataLoader workers fork with the arrays already in memory."""
    from fdpipe.store import open_store

    return MemoryTargets(*(load_stored(open_store(store_url)) if array is None else (array, None)))


class ZeroCostTeacher(torch.nn.Module):
    """What extract's loop reads from a teacher (.info, .data_config, forward), answering every batch with one
    fixed whitened tensor [B, T, C] made up front: an extraction then costs only its data path (decoding,
    cropping, loading) and committing, as on a GPU that keeps up."""

    def __init__(self, info: Any, data_config: dict[str, Any], batch: int, seed: int = 0):
        super().__init__()
        self.info, self.data_config, self.device = info, data_config, torch.device("cpu")
        self.image_size = info.image_size
        self.out = torch.from_numpy(whitened(np.random.default_rng(seed), (batch, info.tokens, info.channels)))

    @classmethod
    def like(cls, teacher: Any, batch: int) -> "ZeroCostTeacher":
        """A stand-in with a real teacher's info (so its store's settings are the real one's) and input transform."""
        return cls(teacher.info, dict(teacher.data_config), batch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if b <= len(self.out):
            return self.out[:b]
        return self.out.repeat(-(-b // len(self.out)), 1, 1)[:b]


def zero_cost_teachers(teachers: dict[str, ZeroCostTeacher]) -> Callable[..., ZeroCostTeacher]:
    """A teacher factory for `extract(cfg, create_teacher=)`: create_teacher(alias, ...) answers teachers[alias]."""
    return lambda alias, *args, **kwargs: teachers[alias]
