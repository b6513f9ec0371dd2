"""The augmentation plan: deterministic per (seed, key, view), within its policy, and applied like torchvision."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from fdpipe.augment import AugmentationPlan, AugParams

PLAN = AugmentationPlan(seed=7, views=4)


def test_same_seed_key_view_gives_identical_params_in_another_process():
    here = [PLAN.sample(f"k{i}", v, (240, 320)).to_dict() for i in range(20) for v in range(4)]
    code = ("import json; from fdpipe.augment import AugmentationPlan as P; p=P(seed=7, views=4); "
            "print(json.dumps([p.sample(f'k{i}', v, (240, 320)).to_dict() for i in range(20) for v in range(4)]))")
    there = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert here == there


def test_different_views_keys_and_seeds_give_different_params():
    base = PLAN.sample("a", 0, (240, 320))
    assert PLAN.sample("a", 1, (240, 320)) != base
    assert PLAN.sample("b", 0, (240, 320)) != base
    assert AugmentationPlan(seed=8, views=4).sample("a", 0, (240, 320)) != base
    seeds = {PLAN.view_seed(f"k{i}", v) for i in range(200) for v in range(4)}
    assert len(seeds) == 800


def test_params_stay_within_the_policy_over_10000_samples():
    h, w = 300, 400
    ps = [PLAN.sample(f"img{i}", i % 4, (h, w)) for i in range(10_000)]
    area = np.array([p.height * p.width / (h * w) for p in ps])
    ratio = np.array([p.width / p.height for p in ps])
    assert area.min() >= 0.08 * 0.97 and area.max() <= 1.0
    assert ratio.min() >= 0.75 * 0.97 and ratio.max() <= (4 / 3) * 1.03
    assert all(0 <= p.top and p.top + p.height <= h and 0 <= p.left and p.left + p.width <= w for p in ps)
    assert abs(np.mean([p.flip for p in ps]) - 0.5) <= 0.02
    assert area.std() > 0.1  # really random, not a constant box


def test_plan_and_params_survive_json():
    assert AugmentationPlan.from_dict(json.loads(json.dumps(PLAN.to_dict()))) == PLAN
    p = PLAN.sample("x", 3, (50, 60))
    assert AugParams.from_dict(json.loads(json.dumps(p.to_dict()))) == p


def test_sampling_from_a_recorded_seed_gives_the_views_params():
    for key, view in (("a", 0), ("b", 3), ("n01440764/x.JPEG", 1023)):
        assert PLAN.sample_seeded(PLAN.view_seed(key, view), (240, 320)) == PLAN.sample(key, view, (240, 320))


@pytest.fixture
def photo():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))


@pytest.mark.parametrize("flip", [False, True])
def test_apply_is_repeatable_and_matches_torchvision_resized_crop(photo, flip):
    p = AugParams(top=10, left=20, height=50, width=70, flip=flip)
    a = np.asarray(PLAN.apply(photo, p, 32, "bicubic"))
    b = np.asarray(PLAN.apply(photo, p, 32, "bicubic"))
    ref = TF.resized_crop(photo, 10, 20, 50, 70, [32, 32], interpolation=InterpolationMode.BICUBIC, antialias=True)
    ref = np.asarray(TF.horizontal_flip(ref) if flip else ref)
    assert a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and np.array_equal(a, ref)


def test_apply_on_uint8_tensor_matches_the_pil_path_box(photo):
    p = AugParams(top=5, left=5, height=40, width=40, flip=True)
    t = torch.from_numpy(np.array(photo)).permute(2, 0, 1).contiguous()
    out = PLAN.apply(t, p, (16, 16), "bilinear")
    assert out.dtype == torch.uint8 and out.shape == (3, 16, 16)
    ref = TF.horizontal_flip(TF.resized_crop(t, 5, 5, 40, 40, [16, 16], antialias=True))
    assert torch.equal(out, ref)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "nearest"])
def test_a_policy_2_view_has_torchvisions_values_in_the_hwc_memory_a_jpeg_encoder_reads(photo, interpolation):
    """The crop is resized in [h, w, 3] memory (2x faster, no reorder for the encoder); a value that changed would be
    a new crop policy, so every box, size and flip is compared with torchvision's resized_crop of the plain tensor."""
    from skimage import data

    plan = AugmentationPlan(seed=3, views=1, scale=(0.001, 1.0), policy_version=2)
    shapes = set()
    for pic in (np.array(photo), data.chelsea()):
        image = plan.prepare(Image.fromarray(pic))
        for k in range(12):
            p = plan.sample(f"k{k}", 0, tuple(pic.shape[:2]))
            for size in ((224, 224), (16, 24), (p.height, p.width)):
                out = plan.apply(image, p, size, interpolation)
                ref = TF.resized_crop(image.contiguous(), p.top, p.left, p.height, p.width, list(size),
                                      interpolation=InterpolationMode(interpolation), antialias=True)
                assert torch.equal(out, TF.horizontal_flip(ref) if p.flip else ref), (p, size)
                shapes.add(out.permute(1, 2, 0).is_contiguous())
    assert True in shapes  # the views the encoder gets are [H, W, 3] in memory, not reordered


def test_views_must_be_positive():
    with pytest.raises(ValueError):
        AugmentationPlan(views=0)


def test_policy_2_resizes_the_images_tensor_and_stays_within_a_tenth_of_a_level_of_policy_1():
    """Policy 2 cuts every view from the image's uint8 tensor (torchvision's kernels, not PIL's): a plan that
    recorded 2 but resized with PIL would give policy 1's pixels exactly, and a wrong box would differ by far more."""
    from skimage import data

    from fdpipe.augment import ViewTransform

    image = Image.fromarray(data.chelsea())  # 300 x 451: a real photo, downscaled as ImageNet's are
    tf = ViewTransform((224, 224), (0.5,) * 3, (0.5,) * 3)
    old, new = AugmentationPlan(seed=3, views=8, policy_version=1), AugmentationPlan(seed=3, views=8, policy_version=2)
    assert isinstance(old.prepare(image), Image.Image) and isinstance(new.prepare(image), torch.Tensor)
    diffs = []
    for v in range(8):
        p = new.sample("chelsea", v, (image.height, image.width))
        assert p == old.sample("chelsea", v, (image.height, image.width))  # the version changes pixels, not boxes
        a, b = tf.pixels(old.prepare(image), p), tf.pixels(new.prepare(image), p)
        assert a.dtype == b.dtype == torch.uint8 and a.shape == b.shape == (3, 224, 224)
        diffs.append((a.float() - b.float()).abs().mean().item())
    assert 0 < np.mean(diffs) <= 0.1, diffs


def test_a_plan_keeps_its_policy_version_and_refuses_one_it_does_not_know():
    from fdpipe.augment import POLICY_VERSION, make_plan
    from fdpipe.errors import FdpipeError

    assert make_plan(1, 2).policy_version == POLICY_VERSION == 2  # new plans: the faster policy
    d = AugmentationPlan(seed=1, views=2, policy_version=1).to_dict()
    assert AugmentationPlan.from_dict(d).policy_version == 1  # a v1 store replays the v1 way
    assert AugmentationPlan.from_dict({k: v for k, v in d.items() if k != "policy_version"}).policy_version == 1
    with pytest.raises(FdpipeError, match="upgrade|policy"):
        AugmentationPlan.from_dict({**d, "policy_version": 3})
    with pytest.raises(FdpipeError, match="--crop-policy 3: choose one of 1, 2"):
        make_plan(1, 2, policy_version=3)
