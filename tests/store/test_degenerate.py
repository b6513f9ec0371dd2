"""Degenerate targets (most of a token's channels on one value) warn at extraction and in `store verify --deep`,
and every dtype's store of effnet-lite0's ReLU6 head, the extreme case, still passes its own verification."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from conftest import ROOT, store_settings, write_photos, write_store
from fdpipe.store.degenerate import DEGENERATE_SHARE, ShareMeter, mode_share
from fdpipe.store.quantize import QUANTIZERS

README = ROOT / "README.md"
WARNING = "of each token's channels sit on one value"


def test_mode_share_is_the_share_of_channels_on_the_most_common_value():
    x = torch.randn(3, 5, 10)
    x[0, :, :7] = -0.4  # 7 of 10 channels on one value, whichever token
    share = mode_share(x)
    assert share.shape == (15,)
    assert torch.allclose(share[:5], torch.tensor(0.7)) and torch.allclose(share[5:], torch.tensor(0.1))


def test_the_meter_warns_only_above_the_threshold():
    meter = ShareMeter()
    assert meter.warning() is None  # nothing measured
    meter.add(torch.randn(2, 4, 16))
    assert meter.share == pytest.approx(1 / 16) and meter.warning() is None
    flat = torch.zeros(2, 4, 16)
    flat[..., 0] = 1.0
    for _ in range(20):  # 15/16 on one value outweighs the dense tokens
        meter.add(flat)
    assert meter.share > DEGENERATE_SHARE and WARNING in meter.warning() and "--layer" in meter.warning()


def relu_head_tokens(shape: tuple[int, ...], c: int = 256) -> np.ndarray:
    """Whitened ReLU-like tokens: 248 of 256 channels at zero before whitening, one far out. The minimum then sits
    half an int8 step from 0, so every channel on it rounds the same way and the token's stored mean is off by 0.056."""
    x = np.zeros(c, np.float32)
    x[0], x[1:8] = 100.0, 1.0
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-6)
    return np.broadcast_to(x, (*shape, c)).astype(np.float32)


def test_an_int8_store_of_relu_like_tokens_verifies_deep_and_warns(cli, tmp_path):
    settings = store_settings(dtype="int8", n=4, t=4, c=256)
    url = str(tmp_path / "s")
    write_store(url, settings, relu_head_tokens((4, 2, 4)))
    r = cli("store", "verify", "--deep", url)
    assert r.exit_code == 0, r.output
    assert "warning: 97% " + WARNING in r.output


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("photos"), n=4, size=(96, 128))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", sorted(QUANTIZERS))
def test_every_dtype_of_the_effnet_head_verifies_and_warns_it_is_degenerate(cli, photos, tmp_path, dtype):
    """The head at its default 224 px: int8 once failed verify --deep ('not whitened', mean 0.05-0.09), because
    the whitening check ignored the int8 step's rounding of the shared minimum."""
    out = tmp_path / "s"
    r = cli("extract", "--teacher", "effnet-lite0", "--data", photos, "--out", out, "--views", 2, "--dtype", dtype,
            "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert len([line for line in r.output.splitlines() if WARNING in line]) == 1, r.output
    r = cli("store", "verify", "--deep", out)
    assert r.exit_code == 0, r.output
    assert r.output.startswith("warning: ") and WARNING in r.output and "ok: " in r.output
    assert "warning" not in cli("store", "verify", out).output  # the warning needs the targets decoded


def readme_extract_example() -> list[str]:
    """The README's runnable effnet-lite0 extraction, as arguments after `fdpipe`."""
    cmd = re.search(r"^fdpipe (extract --teacher effnet-lite0 .*)$", README.read_text(), flags=re.M)
    assert cmd, "the README has no effnet-lite0 extract example"
    return cmd.group(1).split()


@pytest.mark.slow
def test_the_readme_extract_example_does_not_warn(cli, tmp_path):
    args = readme_extract_example()
    assert "--layer" in args
    for flag, value in (("--limit", "8"), ("--out", str(tmp_path / "s"))):  # smaller, and here
        args[args.index(flag) + 1] = value
    r = cli(*args, "--workers", 0, "--quiet")
    assert r.exit_code == 0, r.output
    assert "warning" not in r.output, r.output
    r = cli("store", "verify", "--deep", tmp_path / "s")
    assert r.exit_code == 0 and "warning" not in r.output, r.output
