"""The store contract, typed: what a draft pins (`StoreSettings`) and what a store records of its teacher
(`TeacherInfo`).

Settings are built in one place (`StoreSettings.create` for a new store, `from_dict` for a manifest) and read by
attribute; `to_dict` gives the manifest's objects in the form this fdpipe writes them (the manifest's form does
not change). A store of an earlier version reads with None for what it did not record.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..augment import AugmentationPlan
from ..viewcodec import StudentViews
from ..errors import StoreError
from ..jsonable import json_able


@dataclass(frozen=True)
class TeacherInfo:
    """What a store (and a distilled student) knows about the teacher that made the targets: its names, weights,
    layer, target kind, input contract and the targets' shape. Stores of earlier fdpipe versions record only the
    first six fields: the others are None there (`precision` None: not recorded)."""

    alias: str  # the name as asked for: an alias from fdpipe.models.TEACHERS, or a timm name
    timm_name: str
    tokens: int  # T: prefix tokens first, then grid tokens (1 for logits)
    channels: int  # C (num_classes for logits)
    grid: tuple[int, int]  # (h, w) of the patch tokens; (0, 0) for logits
    num_prefix_tokens: int
    weights_sha256: str | None = None
    layer: int | None = None  # None: forward_features (the FD default); K >= 0: output of block/stage K
    target: str | None = None  # "features" (whitened tokens [T, C]) or "logits" ([num_classes], not whitened)
    pretrained_cfg: dict[str, Any] | None = field(default=None, hash=False)  # JSON-able subset of timm's cfg
    image_size: int | None = None  # square input size the teacher runs at
    precision: str | None = None  # fdpipe.models.PRECISIONS: how the teacher computed the targets

    @property
    def target_shape(self) -> tuple[int, ...]:
        """One view's targets: [T, C] tokens for features, [num_classes] for logits."""
        return (self.channels,) if self.target == "logits" else (self.tokens, self.channels)

    def to_dict(self) -> dict[str, Any]:
        return json_able(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the manifest") -> "TeacherInfo":
        """A manifest's (or a checkpoint's) teacher object; one line naming a missing field."""
        names = [f.name for f in dataclasses.fields(cls)]
        required = names[:6]
        missing = [k for k in required if k not in d]
        if missing:
            raise StoreError(f"{where}: teacher.{missing[0]} is missing; the file is corrupt")
        kwargs = {k: d[k] for k in names if k in d}
        kwargs["grid"] = tuple(int(g) for g in d["grid"])
        return cls(**kwargs)


@dataclass(frozen=True)
class StoreSettings:
    """What a store's draft pins and its manifest repeats: a resumed run must agree on every field."""

    layout: str  # a name of fdpipe.store.manifest.LAYOUTS
    dtype: str  # the stored dtype: a key of fdpipe.store.quantize.QUANTIZERS
    quantizer: dict[str, Any]  # the quantizer's name and parameters (what the reader undoes)
    target: str  # "features" or "logits"
    teacher: TeacherInfo
    whitening: dict[str, Any] | None  # the whitening rule (None for logits)
    plan: AugmentationPlan  # the views of every image
    num_images: int
    views: int
    shard_size: int
    target_shape: tuple[int, ...]  # [T, C] for features, [num_classes] for logits
    data: dict[str, Any]  # {"spec": the source (absolute), "limit": ...}
    codec: str = "none"  # the zarr chunk compressor (fdpipe.store.manifest.CODECS)
    student_views: StudentViews | None = None  # the student pixels stored beside each view's targets (format 4)

    @classmethod
    def create(cls, *, layout: str, dtype: str, teacher: TeacherInfo, plan: AugmentationPlan, num_images: int,
               views: int,
               shard_size: int, data: Mapping[str, Any], codec: str = "none",
               whitening: Mapping[str, Any] | None = None,
               student_views: StudentViews | None = None) -> "StoreSettings":
        """The settings of a new store: the quantizer's record comes from the dtype, the target kind and shape
        from the teacher."""
        from .quantize import get_quantizer

        target = teacher.target or "features"
        return cls(layout=layout, dtype=dtype, quantizer=get_quantizer(dtype).to_dict(), target=target,
                   teacher=teacher, whitening=dict(whitening) if target == "features" and whitening else None,
                   plan=plan, num_images=int(num_images),
                   views=int(views), shard_size=int(shard_size), target_shape=teacher.target_shape, data=dict(data), codec=codec,
                   student_views=student_views)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["teacher"], d["plan"] = self.teacher.to_dict(), self.plan.to_dict()
        d["student_views"] = None if self.student_views is None else self.student_views.to_dict()
        return json_able(d)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], where: str = "the manifest") -> "StoreSettings":
        """A draft's or manifest's settings (checked by `manifest.check_settings` first)."""
        names = [f.name for f in dataclasses.fields(cls)]
        kwargs = {k: d[k] for k in names if k in d}
        kwargs["teacher"] = TeacherInfo.from_dict(d["teacher"], where)
        kwargs["plan"] = AugmentationPlan.from_dict(d["plan"])
        kwargs["student_views"] = StudentViews.from_dict(d.get("student_views"))
        kwargs["target_shape"] = tuple(int(x) for x in d["target_shape"])
        return cls(**kwargs)

    @property
    def data_spec(self) -> str | None:
        """The image source the store was extracted from (absolute; None for a merge of several sources)."""
        return self.data.get("spec")

    @property
    def data_limit(self) -> int | None:
        return self.data.get("limit")

    def replace(self, **changes: Any) -> "StoreSettings":
        return dataclasses.replace(self, **changes)
