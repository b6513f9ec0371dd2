"""Image sources and the one decoder: stable keys/order/labels, random access, and the bad-image zoo."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from fdpipe.data import (
    FASHION_MNIST_DIR,
    ImageDecodeError,
    Sample,
    decode_rgb,
    image_sha256,
    open_source,
    original_size,
)
from fdpipe.errors import FdpipeError


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def noise(h: int = 12, w: int = 16, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """cat/{b.jpg, a.png}, dog/{c.jpeg, sub/d.webp}, plus things that are not images."""
    root = tmp_path / "ds"
    write(root / "cat" / "b.jpg", encode(noise(seed=1), "JPEG"))
    write(root / "cat" / "a.png", encode(noise(seed=2), "PNG"))
    write(root / "dog" / "c.jpeg", encode(noise(seed=3), "JPEG"))
    write(root / "dog" / "sub" / "d.webp", encode(noise(seed=4), "WEBP"))
    write(root / "dog" / "notes.txt", b"not an image")
    write(root / ".hidden" / "x.jpg", encode(noise(), "JPEG"))
    return root


@pytest.fixture
def shards(tmp_path: Path) -> tuple[str, list[tuple[str, bytes, int]]]:
    """Two shards of three samples each, written with webdataset's TarWriter; returns the brace pattern."""
    written = []
    for s in range(2):
        with wds.TarWriter(str(tmp_path / f"shard-{s:06d}.tar")) as sink:
            for j in range(3):
                key = f"img{s}{j}"
                data = encode(noise(seed=10 * s + j), "PNG" if j == 1 else "JPEG")
                ext = "png" if j == 1 else "jpg"
                sink.write({"__key__": key, ext: data, "cls": (s + j) % 2, "json": {"j": j}})
                written.append((key, data, (s + j) % 2))
    return str(tmp_path / "shard-{000000..000001}.tar"), written


# ------------------------------------------------------------------------------------------ folders


def test_folder_labels_keys_and_order_follow_sorted_relative_paths(folder: Path):
    src = open_source(str(folder))
    assert src.keys == ["cat/a", "cat/b", "dog/c", "dog/sub/d"]
    assert src.classes == ["cat", "dog"] and src.num_classes == 2
    assert src.labels == [0, 0, 1, 1]
    assert src.location(0) == str(folder / "cat" / "a.png")
    sample = src[1]
    assert sample == Sample("cat/b", (folder / "cat" / "b.jpg").read_bytes(), 0)
    assert [s.key for s in src] == src.keys
    assert open_source(src.spec).keys == src.keys  # spec reopens it


def test_flat_folder_has_no_labels(tmp_path: Path):
    write(tmp_path / "y.png", encode(noise(), "PNG"))
    write(tmp_path / "x.jpg", encode(noise(), "JPEG"))
    src = open_source(str(tmp_path))
    assert src.keys == ["x", "y"]
    assert src.labels == [None, None] and src.classes is None and src.num_classes is None


def test_keys_have_no_dots_and_collisions_get_their_extension(tmp_path: Path):
    for name in ("a.jpg", "a.png", "img.v2.jpg", "v1.0/pic.JPG", "b.jpg"):
        write(tmp_path / "flat" / name, encode(noise(), "PNG"))
    src = open_source(str(tmp_path / "flat"))
    assert src.keys == ["a_jpg", "a_png", "b", "img_v2", "v1_0/pic"]
    assert all("." not in k for k in src.keys)
    assert len(set(src.keys)) == len(src.keys)


def test_limit_keeps_the_first_n_in_stable_order(folder: Path):
    src = open_source(str(folder), limit=2)
    assert len(src) == 2 and src.keys == ["cat/a", "cat/b"] and src.labels == [0, 0]


def test_missing_path_is_a_one_line_fdpipe_error(tmp_path: Path):
    with pytest.raises(FdpipeError, match=r"^no images at .*missing") as info:
        open_source(str(tmp_path / "missing"))
    assert "\n" not in str(info.value)


def test_folder_without_images_is_an_fdpipe_error(tmp_path: Path):
    write(tmp_path / "readme.txt", b"hi")
    with pytest.raises(FdpipeError, match="^no images at"):
        open_source(str(tmp_path))


# ------------------------------------------------------------------------------------------ file lists


def test_csv_list_resolves_relative_paths_and_maps_string_labels(folder: Path):
    lst = folder / "list.csv"
    lst.write_text("path,label\ndog/c.jpeg,dog\ncat/b.jpg,cat\ncat/a.png,\n")
    src = open_source(str(lst))
    assert src.keys == ["dog/c", "cat/b", "cat/a"]  # the list's own order
    assert src.classes == ["cat", "dog"] and src.labels == [1, 0, None]
    assert src[0].data == (folder / "dog" / "c.jpeg").read_bytes()
    assert src.location(1) == str(folder / "cat" / "b.jpg")


def test_parquet_list_takes_absolute_paths_and_integer_labels(folder: Path, tmp_path: Path):
    paths = [str(folder / "cat" / "a.png"), str(folder / "dog" / "c.jpeg")]
    pq.write_table(pa.table({"path": paths, "label": [7, 3]}), tmp_path / "list.parquet")
    src = open_source(str(tmp_path / "list.parquet"))
    assert len(src) == 2 and src.labels == [7, 3] and src.classes is None and src.num_classes == 8
    assert all("." not in k for k in src.keys)
    assert src[1].data == (folder / "dog" / "c.jpeg").read_bytes()


def test_list_without_path_column_says_so(tmp_path: Path):
    (tmp_path / "l.csv").write_text("file,label\na.jpg,1\n")
    with pytest.raises(FdpipeError, match="no 'path' column"):
        open_source(str(tmp_path / "l.csv"))


# ------------------------------------------------------------------------------------------ webdataset


def test_wds_brace_pattern_reads_keys_labels_and_bytes(shards):
    pattern, written = shards
    src = open_source(pattern)
    assert len(src) == 6
    assert src.keys == [k for k, _, _ in written]
    assert src.labels == [c for _, _, c in written]
    assert [src[i].data for i in range(6)] == [d for _, d, _ in written]
    assert src.location(4).endswith("shard-000001.tar#img11.png")


def test_wds_random_access_equals_sequential_iteration(shards):
    src = open_source(shards[0])
    sequential = list(src)
    assert [src[i] for i in reversed(range(len(src)))] == sequential[::-1]
    # and equals what webdataset itself yields
    for sample, ours in zip(wds.WebDataset(shards[0], shardshuffle=False), sequential):
        assert sample["__key__"] == ours.key
        assert (sample.get("jpg") or sample.get("png")) == ours.data


def test_wds_limit_stops_at_n(shards):
    src = open_source(shards[0], limit=4)
    assert len(src) == 4 and src.keys[-1] == "img10"


def test_wds_keys_are_sanitized_and_samples_without_image_are_left_out(tmp_path: Path):
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "v1.0/a", "png": encode(noise(), "PNG"), "cls": "cat"})
        sink.write({"__key__": "meta", "json": {"x": 1}})
    with pytest.warns(UserWarning, match="1 samples have no image"):
        src = open_source(str(tmp_path / "s.tar"))
    assert src.keys == ["v1_0/a"] and src.classes == ["cat"] and src.labels == [0]


def test_missing_shard_is_an_fdpipe_error(tmp_path: Path):
    with pytest.raises(FdpipeError, match="no images at"):
        open_source(str(tmp_path / "shard-{000000..000001}.tar"))


# ------------------------------------------------------------------------------------------ pickling


def test_sources_pickle_and_read_after_unpickling(folder: Path, shards):
    for src in (open_source(str(folder)), open_source(shards[0])):
        list(src)  # touch the source first, as a parent process would
        clone = pickle.loads(pickle.dumps(src))
        assert clone.keys == src.keys and clone.spec == src.spec
        assert clone[len(clone) - 1] == src[len(src) - 1]


# ------------------------------------------------------------------------------------------ fashion-mnist

needs_fmnist = pytest.mark.skipif(
    not (Path(FASHION_MNIST_DIR) / "t10k-labels-idx1-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist is not installed",
)


@needs_fmnist
def test_fashion_mnist_train_and_test(monkeypatch):
    monkeypatch.delenv("FDPIPE_DATA", raising=False)
    train = open_source("fashion-mnist")
    test = open_source("fashion-mnist", split="test")
    assert (len(train), len(test)) == (60000, 10000)
    assert open_source("fashion-mnist:test", limit=3).keys == test.keys[:3]
    assert train.keys[12] == "fashion-mnist/train/00012" and train.num_classes == 10
    sample = test[5]
    assert isinstance(sample.data, Image.Image) and sample.data.size == (28, 28)
    assert sample.label is not None and 0 <= sample.label <= 9
    assert decode_rgb(sample.data).mode == "RGB"
    assert image_sha256(sample) == image_sha256(test[5]) != image_sha256(test[6])
    clone = pickle.loads(pickle.dumps(test))
    assert len(pickle.dumps(test)) < 1_000_000  # pixels are not pickled
    assert np.array_equal(np.asarray(clone[5].data), np.asarray(sample.data))


@needs_fmnist
def test_fashion_mnist_reads_fdpipe_data(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("FDPIPE_DATA", str(tmp_path))
    (tmp_path / "fashion-mnist").symlink_to(FASHION_MNIST_DIR)
    src = open_source("fashion-mnist:test", limit=2)
    assert src.location(1) == f"{tmp_path}/fashion-mnist/t10k-images-idx3-ubyte.gz#1"


def test_unknown_builtin_split_is_an_fdpipe_error():
    with pytest.raises(FdpipeError, match="no split 'val'"):
        open_source("fashion-mnist:val")


# ------------------------------------------------------------------------------------------ decoding zoo


def test_truncated_jpeg_fails_in_decode():
    data = encode(noise(64, 64), "JPEG", quality=95)
    with pytest.raises(ImageDecodeError, match="truncated") as info:
        decode_rgb(data[: len(data) // 2])
    assert "\n" not in str(info.value)


def test_zero_byte_file_fails():
    with pytest.raises(ImageDecodeError, match="empty file"):
        decode_rgb(b"")


def test_text_named_jpg_fails_through_a_source(tmp_path: Path):
    write(tmp_path / "bad.jpg", b"hello, I am not a JPEG\nsecond line\n")
    src = open_source(str(tmp_path))
    with pytest.raises(ImageDecodeError, match="not a recognised image format") as info:
        decode_rgb(src[0].data)
    assert "\n" not in str(info.value)


def test_cmyk_jpeg_becomes_rgb():
    out = decode_rgb(encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=100))
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 4))
    assert r > 240 and g < 15 and b < 15


def test_16bit_png_scales_to_8_bit():
    arr = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)
    out = decode_rgb(encode(Image.fromarray(arr), "PNG"))
    assert out.mode == "RGB"
    assert np.asarray(out)[0, :, 0].tolist() == [0, 1, 128, 255]


def test_rgba_png_is_composited_on_white():
    img = Image.new("RGBA", (3, 1))
    img.putdata([(255, 0, 0, 255), (0, 0, 0, 0), (0, 0, 0, 128)])
    out = np.asarray(decode_rgb(encode(img, "PNG")))
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]
    assert 120 <= out[0, 2, 0] <= 135


def test_palette_png_with_transparency_is_composited_on_white():
    img = Image.new("P", (2, 1))
    img.putpalette([0, 0, 255, 10, 20, 30] + [0] * 762)
    img.putdata([0, 1])
    out = np.asarray(decode_rgb(encode(img, "PNG", transparency=1)))
    assert out[0, 0].tolist() == [0, 0, 255] and out[0, 1].tolist() == [255, 255, 255]


def test_grayscale_and_1x1_images_decode_to_rgb():
    out = decode_rgb(encode(Image.new("L", (1, 1), 77), "PNG"))
    assert out.mode == "RGB" and out.size == (1, 1) and out.getpixel((0, 0)) == (77, 77, 77)
    assert original_size(out) == (1, 1)


def test_original_size_is_height_width():
    img = noise(5, 9)
    assert original_size(img) == (5, 9)
    assert original_size(encode(img, "PNG")) == (5, 9)
    assert original_size(np.zeros((5, 9, 3))) == (5, 9)


def test_image_sha256_hashes_the_encoded_bytes():
    data = encode(noise(), "PNG")
    import hashlib

    assert image_sha256(Sample("k", data, None)) == hashlib.sha256(data).hexdigest()
