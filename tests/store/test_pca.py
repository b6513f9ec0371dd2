"""pca-K: the quantizer, its basis file, and the store's writer and readers around them."""

import numpy as np
import pytest
import torch

from conftest import one_line_error, store_settings, whitened, write_store
from fdpipe.errors import FdpipeError, StoreError
from fdpipe.store import basis as B
from fdpipe.store import open_store
from fdpipe.store import quantize as Q
from fdpipe.store.fs import StoreLocation


def low_rank_whitened(rng: np.random.Generator, shape: tuple[int, ...], rank: int) -> np.ndarray:
    """Whitened tokens that lie in a `rank`-dimensional span (before the per-token whitening)."""
    *lead, c = shape
    x = rng.standard_normal((*lead, rank)) @ rng.standard_normal((rank, c))
    x = x - x.mean(-1, keepdims=True)
    return (x / x.std(-1, keepdims=True)).astype(np.float32)


def fitted(x: np.ndarray, k: int) -> Q.Quantizer:
    return Q.get_quantizer(f"pca-{k}").with_basis(B.fitted(x, k))


def test_a_token_in_the_basis_span_reads_back_within_int8s_error_of_its_k_coefficients():
    x = low_rank_whitened(np.random.default_rng(0), (40, 3, 16, 64), 8)
    q = fitted(x, 8)
    values, scales = q.quantize(x)
    assert values.dtype == np.int8 and values.shape == (40, 3, 16, 8) and scales.dtype == np.float16
    y = q.dequantize(values, scales)
    assert y.shape == x.shape
    cos = (x * y).sum(-1) / np.linalg.norm(x, axis=-1) / np.linalg.norm(y, axis=-1)
    assert cos.min() > 0.999
    assert np.array_equal(y, q.dequantize_tensor(torch.from_numpy(values), torch.from_numpy(scales)).numpy())


def test_a_reconstruction_keeps_a_whitened_tokens_mean_of_zero_even_past_the_samples_rank():
    """Fewer sample tokens than K: the unfilled directions must still be orthogonal to the all-ones vector, or a
    token's reconstruction would carry a mean (verify --deep checks whitening)."""
    rng = np.random.default_rng(1)
    q = fitted(whitened(rng, (3, 1, 1, 32)), 12)  # 3 tokens, K = 12
    b = q.basis
    assert np.allclose(b.T @ b, np.eye(12), atol=1e-5) and np.abs(b.sum(0)).max() < 1e-5
    y = q.dequantize(*q.quantize(whitened(rng, (50, 1, 1, 32))))
    assert np.abs(y.mean(-1)).max() < 1e-5


def test_a_failed_images_tokens_read_back_as_nan():
    x = low_rank_whitened(np.random.default_rng(2), (2, 2, 4, 16), 4)
    q = fitted(x, 4)
    x[1] = np.nan
    y = q.dequantize(*q.quantize(x))
    assert np.isnan(y[1]).all() and np.isfinite(y[0]).all()


def test_the_basis_file_is_the_same_bytes_for_the_same_basis_and_numpy_reads_it():
    import io

    b = fitted(low_rank_whitened(np.random.default_rng(3), (10, 1, 4, 16), 4), 4).basis
    data = B.encode(b)
    assert B.encode(b.copy()) == data  # no timestamp: a refit after a crash writes the same file
    assert np.array_equal(np.load(io.BytesIO(data))["basis"], b)
    assert np.array_equal(B.decode(data, "basis/pca.npz", 16, 4), b)


@pytest.mark.parametrize("damage,message", [
    (lambda d: d[:len(d) // 2], "basis/pca.npz is corrupt"),
    (lambda d: d[:300] + bytes([d[300] ^ 1]) + d[301:], "is corrupt (Bad CRC-32"),
    (lambda d: B.encode(np.zeros((16, 5), np.float32)), "holds a float32 [16, 5] basis"),
    (lambda d: B.encode(np.full((16, 4), np.nan, np.float32)), "finite float32 [16, 4]"),
], ids=["truncated", "byte-flipped", "other-k", "nan"])
def test_a_damaged_basis_file_is_one_line_naming_it(damage, message):
    data = B.encode(np.eye(16, 4, dtype=np.float32))
    with pytest.raises(StoreError, match=message.replace("[", r"\[").replace("(", r"\(")):
        B.decode(damage(data), "basis/pca.npz", 16, 4)


def test_put_new_keeps_the_first_writers_file(tmp_path):
    loc = StoreLocation(str(tmp_path))
    assert loc.put_new("basis/pca.npz", b"first")
    assert not loc.put_new("basis/pca.npz", b"second")
    assert (tmp_path / "basis" / "pca.npz").read_bytes() == b"first"
    assert [p.name for p in (tmp_path / "basis").iterdir()] == ["pca.npz"]  # no staged file left behind


@pytest.mark.parametrize("dtype,message", [("pca-0", "unknown dtype 'pca-0'"), ("pca-x", "unknown dtype 'pca-x'")])
def test_get_quantizer_refuses_a_k_below_one(dtype, message):
    with pytest.raises(FdpipeError, match=message):
        Q.get_quantizer(dtype)


def test_k_must_be_below_the_channels():
    assert "pca-K needs 1 <= K < 8 (got K = 8)" in Q.get_quantizer("pca-8").check_shape((4, 8))
    assert Q.get_quantizer("pca-7").check_shape((4, 8)) is None


def test_a_pca_store_records_k_and_its_basis_and_the_reader_binds_it(tmp_path):
    settings = store_settings("zarr", "pca-4")
    x = whitened(np.random.default_rng(4), (5, 2, 4, 8))
    write_store(str(tmp_path / "s"), settings, x)
    st = open_store(str(tmp_path / "s"))
    assert st.manifest["quantizer"] == {"name": "pca-int8-v1", "dtype": "pca-4", "scales": "per-token float16",
                                        "rank": 4, "basis": "basis/pca.npz"}
    assert "basis/pca.npz" in st.manifest["metadata_files"]
    assert st.quantizer.basis.shape == (8, 4)
    assert st.quantizer.stored_bytes((4, 8)) == 4 * (4 + 2)  # K int8 coefficients and a float16 scale a token


def test_a_resumed_writer_refuses_committed_shards_without_their_basis(tmp_path):
    from fdpipe.store import StoreWriter

    settings = store_settings("zarr", "pca-4")
    url = str(tmp_path / "s")
    write_store(url, settings, whitened(np.random.default_rng(5), (5, 2, 4, 8)), shards=[0])  # one shard, no manifest
    (tmp_path / "s" / "basis" / "pca.npz").unlink()
    with pytest.raises(StoreError, match="basis/pca.npz is missing"):
        StoreWriter(url, settings).open()


def test_the_cli_refuses_pca_0_as_usage_in_one_line(cli, tmp_path):
    r = cli("extract", "--teacher", "effnet-lite0", "--data", tmp_path, "--out", tmp_path / "o", "--dtype", "pca-0")
    assert r.exit_code == 2 and "K is the number of coefficients a token keeps, at least 1" in r.output, r.output
    assert "Traceback" not in r.output


def test_pca_is_for_whitened_features_not_logits(cli, tmp_path):
    r = cli("extract", "--teacher", "effnet-lite0", "--data", tmp_path, "--out", tmp_path / "o", "--dtype",
            "pca-8", "--target", "logits")
    one_line_error(r, "--dtype pca-8 stores whitened features", "choose --dtype int4 or int8")


def test_coefficients_are_the_reconstruction_before_the_product_by_the_basis():
    x = low_rank_whitened(np.random.default_rng(6), (4, 2, 3, 16), 4)
    q = fitted(x, 4)
    v, s = (torch.from_numpy(a) for a in q.quantize(x))
    coef = q.dequantize_tensor(v, s, coefficients=True)
    assert coef.shape == (4, 2, 3, 4) and torch.equal(coef, v.float() * s.float().unsqueeze(-1))
    assert torch.allclose(coef @ torch.from_numpy(q.basis).T, q.dequantize_tensor(v, s), atol=1e-6)


def test_the_default_shard_size_stays_bounded_for_tiny_targets():
    """A pca-3 view of a one-token teacher is 5 bytes: sized by bytes alone a shard would hold 10^8 images, and its
    zarr shard index (16 bytes a cell) would be more than one pread can read back."""
    from fdpipe.store.writer import MAX_DEFAULT_SHARD_IMAGES, default_shard_size

    assert default_shard_size(2 * 5) == MAX_DEFAULT_SHARD_IMAGES
    assert default_shard_size(8 * 257 * 1024 * 2) == 191  # CLIP-L float16, 8 views: sized by its bytes
