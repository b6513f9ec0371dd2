"""Quantizers: int8 fidelity on real teacher targets, NaN and zero tokens, numpy == torch bytes, devices, and stores
made by the old int8 quantizer (they read; a resume with the new one is refused)."""

import numpy as np
import pytest
import torch

from conftest import store_settings, whitened, write_store
from fdpipe.errors import StoreError
from fdpipe.store import StoreWriter, open_store
from fdpipe.store import quantize as Q

INT8 = Q.get_quantizer("int8")
F16 = Q.get_quantizer("float16")
# The retired quantizer's candidate clip levels, as fractions of a token's largest |value| (1.0 = no clipping).
CLIP_RATIOS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4)


def legacy_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The retired "int8-per-token" search: 21 candidate steps per token, each scored on all C values (slow). fdpipe
    only reads its stores; the tests write them with this, as the old fdpipe did."""
    amax = np.abs(x).max(axis=-1)
    finite = np.isfinite(amax) & (amax > 0)
    base = np.where(finite, amax, 1.0)[..., None]
    low = np.abs(np.where(finite, np.nanmin(np.where(np.isfinite(x), x, 0.0), axis=-1), 0.0))[..., None]
    candidates = []
    for ratio in CLIP_RATIOS:
        step = base * (ratio / 127.0)
        candidates.append(step)
        for k in (np.floor(low / step), np.ceil(low / step)):
            candidates.append(np.where(low > 0, low / np.maximum(1.0, k), step))
    best_err, best_scale = None, None
    for cand in candidates:
        scale = cand.astype(np.float16).astype(np.float32)
        with np.errstate(invalid="ignore"):
            err = ((np.clip(np.rint(np.nan_to_num(x / scale)), -127, 127) * scale - x) ** 2).sum(-1)
        if best_err is None:
            best_err, best_scale = err, scale[..., 0]
        else:
            better = err < best_err
            best_err = np.where(better, err, best_err)
            best_scale = np.where(better, scale[..., 0], best_scale)
    scale = np.where(finite, best_scale, np.where(np.isfinite(amax), 1.0, np.nan)).astype(np.float16)
    s = scale.astype(np.float32)[..., None]
    with np.errstate(invalid="ignore"):
        q = np.clip(np.rint(np.nan_to_num(x / s, nan=0.0)), -127, 127).astype(np.int8)
    return q, scale


class LegacyInt8(Q.Quantizer):
    """The retired quantizer, writing as it did (on the host) and answering on the tensor's device."""

    def quantize_tensor(self, x: torch.Tensor):
        v, s = legacy_int8(x.detach().float().cpu().numpy())
        return torch.from_numpy(v).to(x.device), torch.from_numpy(s).to(x.device)


OLD = LegacyInt8("int8-per-token", "int8", True)


def read_as(name: str, dtype: str = "int8") -> Q.Quantizer:
    """The quantizer a manifest naming `name` reads with."""
    return Q.quantizer_of({"quantizer": {"name": name}, "dtype": dtype}, "manifest.json")


def view_cosine(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine between each view's original and dequantized targets, x and y [B, T, C]."""
    a, b = x.reshape(len(x), -1).astype(np.float64), y.reshape(len(y), -1).astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def relu_whitened(rng: np.random.Generator, shape) -> np.ndarray:
    """Whitened ReLU-like tokens: about 70% of the channels on the token's minimum, as in effnet's features."""
    x = np.maximum(rng.standard_normal(shape) - 0.5, 0).astype(np.float32)
    return ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)).astype(np.float32)


# ------------------------------------------------------------------------------------------ real teacher targets
@pytest.fixture(scope="module")
def photo_views():
    """Three skimage photos, each whole, a crop and a flipped crop: [9, 3, 64, 64] uint8 images (PIL)."""
    from PIL import Image
    from skimage import data

    views = []
    for pic in (data.chelsea(), data.astronaut(), data.coffee()):
        im = Image.fromarray(pic)
        w, h = im.size
        crop = im.crop((w // 8, h // 8, w // 8 + h // 2, h // 8 + h // 2))
        views += [im, crop, crop.transpose(Image.FLIP_LEFT_RIGHT)]
    return views


def teacher_targets(views, layer):
    from torchvision.transforms.v2 import functional as TF

    from fdpipe.models import create_teacher

    teacher = create_teacher("effnet-lite0", image_size=64, device="cpu", layer=layer)
    cfg = teacher.data_config
    x = torch.stack([TF.normalize(TF.pil_to_tensor(v.convert("RGB").resize((64, 64))).float() / 255,
                                  list(cfg["mean"]), list(cfg["std"])) for v in views])
    return teacher(x).numpy()


@pytest.mark.slow
@pytest.mark.parametrize("layer", [None, 4], ids=["features", "layer4"])
def test_int8_keeps_real_effnet_targets_at_cosine_9999_as_the_old_search_did(photo_views, layer):
    x = teacher_targets(photo_views, layer)  # [9, T, C] whitened
    if layer is None:  # ReLU features: most channels of a token on its minimum, the case min-exact steps are for
        assert (x == x.min(-1, keepdims=True)).mean() > 0.5
    values, scales = INT8.quantize(x)
    assert values.dtype == np.int8 and scales.dtype == np.float16 and scales.shape == x.shape[:-1]
    y = INT8.dequantize(values, scales)
    cos = view_cosine(x, y)
    assert cos.min() >= 0.9999, cos
    old = OLD.dequantize(*OLD.quantize(x))
    assert cos.min() >= view_cosine(x, old).min() - 1e-6  # the same fidelity as the 21-candidate search ...
    assert ((y - x) ** 2).sum() <= 1.1 * ((old - x) ** 2).sum()  # ... within 10% of its squared error
    # and far better than a plain absmax step on ReLU features
    if layer is None:
        s = (np.abs(x).max(-1, keepdims=True) / 127).astype(np.float16).astype(np.float32)
        plain = np.clip(np.rint(x / s), -127, 127) * s
        assert ((y - x) ** 2).sum() < 0.8 * ((plain - x) ** 2).sum()


# ------------------------------------------------------------------------------------------ special tokens
def test_nan_tokens_give_zero_values_and_a_nan_scale_and_zero_tokens_scale_one():
    x = whitened(np.random.default_rng(0), (2, 6, 32))
    x[0, 0] = np.nan  # an image that failed to decode
    x[0, 1, 3] = np.nan  # one NaN is enough
    x[0, 2, 7] = np.inf
    x[0, 3] = 0.0
    for q in (INT8, OLD):
        values, scales = q.quantize(x)
        assert np.isnan(scales[0, :3]).all() and (values[0, :3] == 0).all(), q.name
        assert scales[0, 3] == 1.0 and (values[0, 3] == 0).all(), q.name
        assert np.isfinite(scales[0, 4:]).all() and np.isfinite(scales[1]).all()
    y = INT8.dequantize(*INT8.quantize(x))
    assert np.isnan(y[0, :3]).all() and (y[0, 3] == 0).all()
    assert view_cosine(x[1:], y[1:]).min() > 0.9999
    v16, s16 = F16.quantize(x)
    assert s16 is None and v16.dtype == np.float16 and np.isnan(v16[0, 0]).all() and np.isnan(v16[0, 1, 3])


def test_constant_tiny_and_huge_tokens_stay_finite():
    x = np.zeros((4, 16), np.float32)
    x[0] = 2.5  # constant: every channel on the minimum and the maximum
    x[1] = -1e-9  # below float16's range of scales
    x[2, ::2] = 1e30  # above it: clipped, but finite
    x[3, :8], x[3, 8:] = -0.5, 3.0
    values, scales = INT8.quantize(x)
    y = INT8.dequantize(values, scales)
    assert np.isfinite(scales).all() and np.isfinite(y).all()
    assert np.allclose(y[0], x[0], rtol=1e-3) and np.abs(y[1] - x[1]).max() < 1e-7
    assert np.allclose(y[3], x[3], rtol=1e-3)  # both values sit on the grid


# ------------------------------------------------------------------------------------------ numpy == torch
def test_numpy_and_torch_give_identical_bytes_whatever_the_batching(monkeypatch):
    rng = np.random.default_rng(1)
    x = np.concatenate([relu_whitened(rng, (3, 37, 96)), whitened(rng, (3, 37, 96))])
    values, scales = INT8.quantize(x)
    tv, ts = INT8.quantize_tensor(torch.from_numpy(x))
    assert tv.numpy().tobytes() == values.tobytes() and ts.numpy().tobytes() == scales.tobytes()
    # float64, non-contiguous input, one view at a time, and small blocks and chunks: the same bytes
    tv, ts = INT8.quantize_tensor(torch.from_numpy(x.astype(np.float64)).transpose(0, 1).contiguous().transpose(0, 1))
    assert tv.numpy().tobytes() == values.tobytes() and ts.numpy().tobytes() == scales.tobytes()
    one = [INT8.quantize(v) for v in x]
    assert np.stack([v for v, _ in one]).tobytes() == values.tobytes()
    assert np.stack([s for _, s in one]).tobytes() == scales.tobytes()
    monkeypatch.setattr(Q, "CPU_BLOCK_ROWS", 50)
    monkeypatch.setattr(Q, "CPU_CHUNK_ROWS", 7)
    v2, s2 = INT8.quantize(x)
    assert v2.tobytes() == values.tobytes() and s2.tobytes() == scales.tobytes()
    v16 = F16.quantize(x)[0]
    assert F16.quantize_tensor(torch.from_numpy(x))[0].numpy().tobytes() == v16.tobytes()
    assert v16.tobytes() == x.astype(np.float16).tobytes()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_tensor_keeps_the_device_and_returns_the_stored_dtypes(device):
    rng = np.random.default_rng(2)
    x = np.concatenate([relu_whitened(rng, (2, 9, 64)), whitened(rng, (2, 9, 64))])
    x[0, 0] = np.nan
    t = torch.from_numpy(x).to(device)
    values, scales = INT8.quantize_tensor(t)
    assert values.device == t.device and values.dtype == torch.int8 and values.shape == t.shape
    assert scales.device == t.device and scales.dtype == torch.float16 and scales.shape == t.shape[:-1]
    want_v, want_s = INT8.quantize(x)  # the same bytes on every device
    assert values.cpu().numpy().tobytes() == want_v.tobytes() and scales.cpu().numpy().tobytes() == want_s.tobytes()
    y = INT8.dequantize_tensor(values, scales)
    assert y.device == t.device and y.dtype == torch.float32
    assert np.array_equal(y.cpu().numpy(), INT8.dequantize(want_v, want_s), equal_nan=True)
    v16, s16 = F16.quantize_tensor(t)
    assert s16 is None and v16.device == t.device and v16.dtype == torch.float16
    y16 = F16.dequantize_tensor(v16)
    assert y16.dtype == torch.float32 and y16.device == t.device
    # the old quantizer still quantizes (on the host) and answers on the tensor's device
    ov, os_ = OLD.quantize_tensor(t)
    assert ov.device == t.device and ov.dtype == torch.int8 and os_.dtype == torch.float16


# ------------------------------------------------------------------------------------------ names and stores
def test_int8_writes_under_a_new_name_and_old_names_still_resolve():
    assert INT8.name == "int8-per-token-v2" and INT8.to_dict()["dtype"] == "int8"
    assert read_as("int8-per-token-v2") is INT8 and read_as("float16", "float16") is F16
    old = read_as("int8-per-token")
    assert old.name == "int8-per-token" and old.dtype == "int8" and old.has_scales
    with pytest.raises(StoreError, match="unknown quantizer 'int8-per-channel'"):
        read_as("int8-per-channel")
    with pytest.raises(StoreError, match="quantizer 'float16' stores float16, but dtype is 'int8'"):
        read_as("float16")
    assert store_settings("zarr", "int8").quantizer["name"] == "int8-per-token-v2"  # what a new draft records


def old_settings(**kw):
    return store_settings("zarr", "int8", **kw).replace(quantizer=OLD.to_dict())


@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_a_store_made_by_the_old_quantizer_still_reads(tmp_path, monkeypatch, layout):
    settings = old_settings(n=4, s=2).replace(layout=layout)
    x = relu_whitened(np.random.default_rng(3), (4, 2, 4, 8))
    url = str(tmp_path / "old")
    with monkeypatch.context() as m:  # write it exactly as the old fdpipe did
        m.setitem(Q.QUANTIZERS, "int8", OLD)
        write_store(url, settings, x)
    st = open_store(url)
    assert st.manifest["quantizer"]["name"] == "int8-per-token"
    got = np.stack([it.targets for it in st.iter_images()])
    assert np.array_equal(got, OLD.dequantize(*OLD.quantize(x)))
    q = st.quantizer
    assert q.name == "int8-per-token" and type(q) is Q.Quantizer  # read by name, with fdpipe's own formula
    stored = list(st.iter_stored())
    v = np.stack([it.values for it in stored])
    s = np.stack([it.scales for it in stored])
    assert np.array_equal(q.dequantize(v, s), got)
    assert np.array_equal(INT8.dequantize_tensor(torch.from_numpy(v), torch.from_numpy(s)).numpy(), got)


def test_resuming_an_old_int8_store_with_the_new_quantizer_is_refused_in_one_line(tmp_path):
    settings = old_settings(n=6, s=2)
    x = whitened(np.random.default_rng(4), (6, 2, 4, 8))
    url = str(tmp_path / "old")
    write_store(url, settings, x, shards=[0])  # a partial store: the draft names the old quantizer
    new = settings.replace(quantizer=INT8.to_dict())
    with pytest.raises(StoreError) as e:
        StoreWriter(url, new).open()
    msg = str(e.value)
    assert "made with other settings: quantizer.name is 'int8-per-token' there, 'int8-per-token-v2' now" in msg
    assert "\n" not in msg
    assert StoreWriter(url, settings).open() == {0}  # the draft is untouched


@pytest.mark.slow
def test_extract_refuses_to_resume_a_store_of_the_old_int8_quantizer(cli, tmp_path, monkeypatch):
    from conftest import write_photos

    photos = write_photos(tmp_path / "photos", 2)
    args = ["extract", "--teacher", "effnet-lite0", "--data", photos, "--out", tmp_path / "s", "--image-size", 32,
            "--views", 2, "--dtype", "int8", "--workers", 0, "--quiet"]
    with monkeypatch.context() as m:  # the store an fdpipe from before int8-per-token-v2 made
        m.setitem(Q.QUANTIZERS, "int8", OLD)
        assert cli(*args).exit_code == 0
    assert open_store(str(tmp_path / "s")).manifest["quantizer"]["name"] == "int8-per-token"
    r = cli(*args)
    assert r.exit_code == 1 and len(r.output.strip().splitlines()) == 1, r.output
    assert "made with other settings: quantizer.name is 'int8-per-token' there" in r.output


# ------------------------------------------------------------------------------------------------ int4
INT4 = Q.get_quantizer("int4")


def int4_reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int4 written out plainly in numpy: every candidate step scored on every channel, the least squared error
    kept, the nibbles packed low channel first."""
    amax = np.abs(x).max(-1, keepdims=True)
    base = np.where(np.isfinite(amax) & (amax > 0), amax, 1.0) / 7
    with np.errstate(invalid="ignore", over="ignore"):
        rms = np.where(np.isfinite(amax) & (amax > 0), np.sqrt((x.astype(np.float32) ** 2).mean(-1, keepdims=True)), 1)
    errs, steps = [], []
    for s in [base * f for f in Q.INT4_FRACTIONS] + [rms * Q.INT4_RMS_STEP]:
        s = np.clip(s, 2.0 ** -24, 65504).astype(np.float16).astype(np.float32)
        errs.append(((np.clip(np.rint(x / s), -7, 7) * s - x) ** 2).sum(-1))
        steps.append(s[..., 0])
    errs = np.nan_to_num(np.stack(errs), nan=0.0)
    s = np.take_along_axis(np.stack(steps), errs.argmin(0)[None], 0)[0]  # the first of equal errors, as torch
    s = np.where(amax[..., 0] == 0, 1.0, s)
    with np.errstate(invalid="ignore"):
        q = (np.clip(np.rint(x / s[..., None]), -7, 7) + 8)
    bad = ~np.isfinite(amax[..., 0])
    q[bad] = 8
    q = q.astype(np.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4), np.where(bad, np.nan, s).astype(np.float16)


def test_int4_packs_two_channels_a_byte_low_channel_first_with_the_least_squared_error_step():
    rng = np.random.default_rng(5)
    x = np.concatenate([relu_whitened(rng, (3, 11, 64)), whitened(rng, (3, 11, 64))])
    values, scales = INT4.quantize(x)
    assert values.dtype == np.uint8 and values.shape == (6, 11, 32) and scales.shape == (6, 11)
    want_v, want_s = int4_reference(x)
    assert values.tobytes() == want_v.tobytes() and scales.tobytes() == want_s.tobytes()
    # a token of known values: channel 0 -> low nibble, channel 1 -> high nibble, offset 8
    one = np.array([[7.0, -7.0, 1.0, 0.0]], np.float32)
    v, s = INT4.quantize(one)
    assert s[0] == 1.0 and v.tolist() == [[15 | (1 << 4), 9 | (8 << 4)]]
    assert INT4.dequantize(v, s).tolist() == one.tolist()


def test_int4_keeps_dense_whitened_targets_near_cosine_0993_and_clips_where_that_costs_less():
    x = whitened(np.random.default_rng(6), (4, 257, 1024))
    y = INT4.dequantize(*INT4.quantize(x))
    cos = view_cosine(x, y)
    assert cos.min() > 0.99, cos
    s = (np.abs(x).max(-1, keepdims=True) / 7).astype(np.float16).astype(np.float32)
    plain = np.clip(np.rint(x / s), -7, 7) * s  # absmax: nothing clips, a coarser step
    assert ((y - x) ** 2).sum() < 0.8 * ((plain - x) ** 2).sum()


def test_int4_nan_zero_tokens_and_torch_bytes_on_every_device():
    x = whitened(np.random.default_rng(7), (2, 6, 32))
    x[0, 0] = np.nan
    x[0, 1, 3] = np.inf
    x[0, 2] = 0.0
    values, scales = INT4.quantize(x)
    assert np.isnan(scales[0, :2]).all() and (values[0, :2] == 0x88).all()
    assert scales[0, 2] == 1.0 and (values[0, 2] == 0x88).all()
    y = INT4.dequantize(values, scales)
    assert np.isnan(y[0, :2]).all() and (y[0, 2] == 0).all() and np.isfinite(y[0, 3:]).all()
    for device in DEVICES:
        tv, ts = INT4.quantize_tensor(torch.from_numpy(x).to(device))
        assert tv.dtype == torch.uint8 and tv.device.type == device
        assert tv.cpu().numpy().tobytes() == values.tobytes() and ts.cpu().numpy().tobytes() == scales.tobytes()
        yt = INT4.dequantize_tensor(tv, ts)
        assert np.array_equal(yt.cpu().numpy(), y, equal_nan=True)


INT4_FIXED = Q.get_quantizer("int4-fixed")


def test_int4_fixed_is_int4s_nibbles_at_one_step_exactly_a_quarter_of_float16_with_nibble_0_for_nan():
    """One step for every token, no scales: round(x / s) clipped to +-7 plus 8, channel 2i in the low nibble; a
    non-finite token is nibbles 0 and reads back as NaN (a failed image), on every device alike."""
    x = whitened(np.random.default_rng(3), (2, 6, 32))
    x[0, 0] = np.nan
    x[0, 1, 3] = np.inf
    values, scales = INT4_FIXED.quantize(x)
    s = np.float32(INT4_FIXED.step)
    q = (np.clip(np.round(x / s), -7, 7) + 8).astype(np.uint8)
    want = q[..., 0::2] | (q[..., 1::2] << 4)
    assert scales is None and values.shape == (2, 6, 16)
    assert (values[0, :2] == 0).all() and np.array_equal(values[0, 2:], want[0, 2:])
    assert np.array_equal(values[1], want[1])
    y = INT4_FIXED.dequantize(values)
    assert np.isnan(y[0, :2]).all() and np.isfinite(y[0, 2:]).all()
    inside = np.abs(x[1]) <= 7 * s
    assert np.all(np.abs(y[1] - x[1])[inside] <= s / 2 + 1e-6)
    assert INT4_FIXED.stored_bytes([257, 1024]) * 4 == Q.get_quantizer("float16").stored_bytes([257, 1024])
    for device in DEVICES:
        tv, ts = INT4_FIXED.quantize_tensor(torch.from_numpy(x).to(device))
        assert ts is None and tv.cpu().numpy().tobytes() == values.tobytes()
        assert np.array_equal(INT4_FIXED.dequantize_tensor(tv).cpu().numpy(), y, equal_nan=True)


def test_int4_fixed_is_refused_for_logits_in_one_line_saying_what_to_choose():
    from fdpipe.errors import FdpipeError
    from fdpipe.extract import ExtractConfig

    with pytest.raises(FdpipeError, match="--dtype int4-fixed stores whitened features .*choose --dtype int4 or int8"):
        ExtractConfig(teacher="effnet-lite0", data="x", out="y", dtype="int4-fixed", target="logits")


def test_int4_refuses_an_odd_channel_count_saying_what_to_choose():
    assert "9 channels (odd); choose --dtype int8 or float16" in INT4.check_shape([5, 9])
    assert INT4.check_shape([5, 8]) is None and INT8.check_shape([5, 9]) is None
    with pytest.raises(ValueError, match="packs 2 channels a byte"):
        INT4.quantize(np.zeros((2, 9), np.float32))


def test_the_command_lines_dtypes_are_the_quantizers_that_write():
    from fdpipe.options import DTYPES, WHITENED_ONLY_DTYPES

    assert DTYPES == tuple(Q.QUANTIZERS)
    assert WHITENED_ONLY_DTYPES == tuple(d for d, q in Q.QUANTIZERS.items() if q.whitened_only)


def test_stored_bytes_are_the_bytes_one_view_writes_values_and_scales():
    """What bench/bytes reports and what sizes a shard is what the quantizer's arrays hold: int4's packing and the
    per-token float16 scales included (float16 [257, 1024]: 526,336; int8 + scales 263,682; int4 + scales 132,098)."""
    shape = (257, 1024)
    x = whitened(np.random.default_rng(0), (2, *shape))
    for dtype, q in Q.QUANTIZERS.items():
        values, scales = q.quantize(x)
        assert q.values_bytes(shape) == values[0].nbytes, dtype
        assert q.stored_bytes(shape) == values[0].nbytes + (0 if scales is None else scales[0].nbytes), dtype
    assert [Q.QUANTIZERS[d].stored_bytes(shape) for d in ("float16", "int8", "int4")] == [526336, 263682, 132098]
