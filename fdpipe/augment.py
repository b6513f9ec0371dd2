"""The augmentation plan: (key, view) -> seed -> crop parameters, and applying them.

A stored target only means something together with the exact crop it was computed on, so parameters are a pure
function of (plan.seed, key, view) drawn from a private Philox stream, never from a global RNG. Parameters live in
pixels of the original image; every consumer applies the same box and only differs in the final resize.

torch and torchvision load on first use (`_tf`), numpy on the first sample, so that the settings' checks
(`make_plan`) and the options that import `MAX_VIEWS` answer before them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Sequence

from .seeds import derive_seed

if TYPE_CHECKING:
    import numpy as np
    import torch
    from PIL import Image
    from torchvision.transforms import InterpolationMode

POLICY_NAME = "fd-rrc-flip"
# 1: crops resized by PIL; 2: by torchvision's antialiased uint8 kernels on the image's tensor, 2.5x PIL's speed at
# 224 px (the pixels differ by about 0.03/255 on average, so a v1 store's views are replayed the v1 way)
POLICY_VERSION = 2
POLICY_VERSIONS = (1, 2)
MAX_VIEWS = 1024  # the most views a plan (and so a store) may have: far beyond any real one, bounded for the readers


@dataclass(frozen=True)
class AugParams:
    """One view's crop box in pixels of the original image, plus the horizontal flip."""

    top: int
    left: int
    height: int
    width: int
    flip: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AugParams":
        return cls(int(d["top"]), int(d["left"]), int(d["height"]), int(d["width"]), bool(d["flip"]))


def view_seed(plan_seed: int, key: str, view: int) -> int:
    """64-bit seed of one (key, view): stable across processes, machines and Python versions."""
    return derive_seed(plan_seed, key, view)


def sample_resized_crop(
    rng: np.random.Generator,
    size: tuple[int, int],
    scale: tuple[float, float],
    ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng`: 10 attempts, then the centre crop."""
    height, width = size
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _tf() -> ModuleType:
    """torchvision.transforms.v2.functional, imported on first use (3 s with torch: not for a usage error)."""
    from torchvision.transforms.v2 import functional

    return functional


def _size2(size: int | Sequence[int]) -> list[int]:
    return [int(size), int(size)] if isinstance(size, int) else [int(s) for s in size]


def hwc_crop(image: torch.Tensor, params: AugParams) -> torch.Tensor:
    """The box of `image` (uint8 [3, H, W] in [H, W, 3] memory, as pil_to_tensor gives it) as a [1, 3, h, w] view
    whose batch stride says channels_last beyond doubt.

    Resized from it, torch's uint8 kernels (which work in [h, w, 3] order) keep that layout: 0.24 ms a view at 224 px
    instead of 0.41 for the same values from the plain slice, whose output they reorder to [3, H, W] (pytorch#68430),
    and the JPEG encoder then reads the view as it is (0.18 ms instead of 0.52 with a reorder)."""
    import torch

    box = image[:, params.top:params.top + params.height, params.left:params.left + params.width].unsqueeze(0)
    return box.contiguous(memory_format=torch.channels_last)


def interpolation_mode(name: str | InterpolationMode) -> InterpolationMode:
    """timm's pretrained_cfg names ('bicubic', 'bilinear', ...) as torchvision modes."""
    from torchvision.transforms import InterpolationMode

    return name if isinstance(name, InterpolationMode) else InterpolationMode(name)


@dataclass(frozen=True)
class AugmentationPlan:
    """V views per image, each a RandomResizedCrop + flip drawn from its own seed (the FD policy, no colour jitter)."""

    seed: int = 0
    views: int = 8
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    policy: str = field(default=POLICY_NAME)
    policy_version: int = field(default=POLICY_VERSION)

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        object.__setattr__(self, "scale", tuple(float(s) for s in self.scale))
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        object.__setattr__(self, "ratio", tuple(float(r) for r in self.ratio))
        if self.policy_version not in POLICY_VERSIONS:
            raise ValueError(f"crop policy version must be one of {POLICY_VERSIONS}, got {self.policy_version}")

    def view_seed(self, key: str, view: int) -> int:
        return view_seed(self.seed, key, view)

    def sample(self, key: str, view: int, size: tuple[int, int]) -> AugParams:
        """Parameters of `view` of image `key` whose original (height, width) is `size`."""
        return self.sample_seeded(self.view_seed(key, view), size)

    def sample_seeded(self, seed: int, size: tuple[int, int]) -> AugParams:
        """Parameters drawn from a view's seed (`view_seed`), for a caller that records the seed too (extract)."""
        import numpy as np

        rng = np.random.Generator(np.random.Philox(seed))
        top, left, h, w = sample_resized_crop(rng, size, self.scale, self.ratio)
        flip = bool(rng.random() < self.flip_p)
        return AugParams(top, left, h, w, flip)

    def prepare(self, image: Image.Image) -> Image.Image | torch.Tensor:
        """What this plan's views are cut from: the decoded RGB image itself (policy 1, PIL resizes), or its uint8
        [3, H, W] tensor (policy 2, torchvision's uint8 kernels resize): converted once per image, not per view."""
        return image if self.policy_version == 1 else _tf().pil_to_tensor(image)

    @staticmethod
    def apply(
        image: Image.Image | torch.Tensor,
        params: AugParams,
        size: int | Sequence[int],
        interpolation: str | InterpolationMode = "bicubic",
    ) -> Image.Image | torch.Tensor:
        """Crop the stored box, resize to `size` with the consumer's interpolation, then flip if the view says so.

        A tensor view comes back [3, H, W] in [H, W, 3] memory (`hwc_crop`), what a JPEG encoder reads without a
        reorder; the values are torchvision's resized_crop's."""
        TF = _tf()
        mode = interpolation_mode(interpolation)
        if hasattr(image, "getbands"):
            out = TF.resized_crop(image, params.top, params.left, params.height, params.width, _size2(size),
                                  interpolation=mode, antialias=True)
        else:
            out = TF.resize(hwc_crop(image, params), _size2(size), interpolation=mode, antialias=True)[0]
        return TF.horizontal_flip(out) if params.flip else out

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scale"], d["ratio"] = list(self.scale), list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AugmentationPlan":
        d = dict(d)
        if d.get("policy", POLICY_NAME) != POLICY_NAME or int(d.get("policy_version", 1)) not in POLICY_VERSIONS:
            from .errors import FdpipeError

            raise FdpipeError(
                f"augmentation policy {d.get('policy')} v{d.get('policy_version')} is unknown to this fdpipe "
                f"({POLICY_NAME} v{POLICY_VERSION}); upgrade fdpipe"
            )
        return cls(
            seed=int(d["seed"]), views=int(d["views"]), scale=tuple(d["scale"]), ratio=tuple(d["ratio"]),
            flip_p=float(d["flip_p"]), policy=d.get("policy", POLICY_NAME),
            policy_version=int(d.get("policy_version", 1)),  # plans before versions were recorded: PIL's
        )


@dataclass(frozen=True)
class ViewTransform:
    """How one model sees a view: the shared crop box, then its own size, interpolation and normalization."""

    size: tuple[int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"

    @classmethod
    def from_data_config(cls, cfg: dict[str, Any]) -> "ViewTransform":
        """From timm's resolved data config (input_size (3, H, W), mean, std, interpolation)."""
        _, h, w = cfg["input_size"]
        return cls((int(h), int(w)), tuple(map(float, cfg["mean"])), tuple(map(float, cfg["std"])),
                   str(cfg.get("interpolation", "bicubic")))

    def __call__(self, image: Image.Image | torch.Tensor, params: AugParams) -> torch.Tensor:
        """float32 [3, H, W], normalized: `normalize(pixels(image, params))`."""
        return self.normalize(self.pixels(image, params))

    def pixels(self, image: Image.Image | torch.Tensor, params: AugParams) -> torch.Tensor:
        """uint8 [3, H, W]: the cropped, resized, flipped view, before normalization, of what `plan.prepare` gave
        (a PIL image is resized by PIL, a uint8 tensor by torchvision's kernels).

        Replay hands views across the DataLoader in this form (4x fewer bytes than float32) and the training
        process normalizes them on its device, as timm's PrefetchLoader does.
        """
        out = AugmentationPlan.apply(image, params, self.size, self.interpolation)
        return out if not hasattr(out, "getbands") else _tf().pil_to_tensor(out)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., 3, H, W] on any device -> float32, scaled to [0, 1] and normalized by this model's mean/std."""
        import torch

        TF = _tf()
        x = TF.to_dtype(pixels, torch.float32, scale=True)
        # in place on the new float tensor (not on a float caller's own): the same values, and one float32 batch
        # allocated instead of two (at 64 views of 224 px each is 38 MB: half the normalization's CPU time)
        return TF.normalize(x, list(self.mean), list(self.std), inplace=x is not pixels)


def make_plan(seed: int, views: int, crop_scale: Sequence[float] = (0.08, 1.0),
              policy_version: int = POLICY_VERSION) -> AugmentationPlan:
    """The plan from command-line settings; a bad setting is one line naming the option."""
    from .errors import FdpipeError

    if views < 1:
        raise FdpipeError(f"--views must be at least 1 (got {views})")
    lo, hi = (float(s) for s in crop_scale)
    if not 0 < lo <= hi <= 1:
        raise FdpipeError(f"--crop-scale {lo:g} {hi:g}: need 0 < MIN <= MAX <= 1 (the area fraction of each crop)")
    if policy_version not in POLICY_VERSIONS:
        raise FdpipeError(f"--crop-policy {policy_version}: choose one of {', '.join(map(str, POLICY_VERSIONS))}")
    return AugmentationPlan(seed=seed, views=views, scale=(lo, hi), policy_version=int(policy_version))
