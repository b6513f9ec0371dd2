"""Shared fixtures: small real stores built through fdpipe's own writer, and the CLI runner."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see fdpipe/__init__.py

import numpy as np
import pytest
from click.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")


def write_photos(folder, n: int = 6, size=(48, 64)):
    """Real-looking small photos: crops of skimage's bundled pictures, alternating between two class folders."""
    from pathlib import Path

    from PIL import Image
    from skimage import data

    folder = Path(folder)
    pics = [data.astronaut(), data.chelsea(), data.coffee(), data.rocket()]
    for i in range(n):
        cls = folder / ("cat" if i % 2 else "dog")
        cls.mkdir(parents=True, exist_ok=True)
        pic = pics[i % len(pics)]
        y, x = (i * 17) % (pic.shape[0] - size[0]), (i * 29) % (pic.shape[1] - size[1])
        Image.fromarray(pic[y:y + size[0], x:x + size[1]]).save(cls / f"img{i}.png")
    return folder


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(section: str, lang: str = "python") -> str:
    """The first ```lang block of README.md's '## section': tests run what the README tells readers to run."""
    import re

    text = README.read_text().split(f"## {section}\n", 1)[1]
    return re.findall(rf"```{lang}\n(.*?)```", text.split("\n## ", 1)[0], flags=re.S)[0]


def whitened(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32)
    return ((x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)).astype(np.float32)


def store_settings(layout: str = "zarr", dtype: str = "float16", n: int = 5, v: int = 2, t: int = 4, c: int = 8,
                   s: int = 2, seed: int = 0, teacher: str = "synthetic"):
    """A small store's settings, built as extract builds them (`StoreSettings.create`)."""
    from fdpipe.augment import AugmentationPlan
    from fdpipe.models import WHITENING
    from fdpipe.store.contract import StoreSettings, TeacherInfo

    info = TeacherInfo(alias=teacher, timm_name=teacher, tokens=t, channels=c, grid=(2, 2), num_prefix_tokens=0)
    return StoreSettings.create(layout=layout, dtype=dtype, teacher=info, plan=AugmentationPlan(seed=seed, views=v),
                                num_images=n, views=v, shard_size=s, data={"spec": "synthetic"}, whitening=WHITENING)


def shard_rows(settings, shard: int) -> list[dict]:
    plan, s, n, v = settings.plan, settings.shard_size, settings.num_images, settings.views
    rows = []
    for i in range(shard * s, min((shard + 1) * s, n)):
        key = f"img/{i:04d}"
        for view in range(v):
            p = plan.sample(key, view, (40 + i, 50))
            rows.append(dict(image_idx=i, key=key, source=f"/data/{key}.png", label=i % 3, view=view,
                             seed=plan.view_seed(key, view), **p.to_dict(), orig_height=40 + i, orig_width=50,
                             image_sha256=f"{i:064x}", status="ok"))
    return rows


def open_writer(url: str, settings, targets: np.ndarray):
    """fdpipe's writer on `url`, opened; a pca-K store's basis fitted on the first shard of `targets` (all its
    images, as extract fits it) and put in the store."""
    from fdpipe.store import StoreWriter, shard_range
    from fdpipe.store.basis import fitted

    w = StoreWriter(url, settings)
    w.open()
    if w.needs_basis:
        w.put_basis(fitted(targets[slice(*shard_range(0, w.s, w.n))], w.q.rank))
    return w


def write_store(url: str, settings, targets: np.ndarray, shards: list[int] | None = None,
                edit_row=None) -> None:
    """The store of `targets` through fdpipe's writer; `edit_row(row) -> row` changes index rows on the way."""
    from fdpipe.store import shard_range

    w = open_writer(url, settings, targets)
    for shard in range(w.num_shards) if shards is None else shards:
        a, b = shard_range(shard, w.s, w.n)
        rows = shard_rows(settings, shard)
        w.write_stored(shard, *w.q.quantize(targets[a:b]), rows if edit_row is None else [edit_row(r) for r in rows])
    w.try_finalize()


@pytest.fixture
def make_store(tmp_path):
    """Build a small complete store; returns (url, float32 targets written, settings)."""

    def make(layout: str = "zarr", dtype: str = "float16", name: str | None = None, **kw):
        settings = store_settings(layout, dtype, **kw)
        n, v, (t, c) = settings.num_images, settings.views, settings.target_shape
        targets = whitened(np.random.default_rng(kw.get("seed", 0)), (n, v, t, c))
        url = str(tmp_path / (name or f"{layout}-{dtype}"))
        write_store(url, settings, targets)
        return url, targets, settings

    return make


@pytest.fixture
def cli():
    """Invoke the fdpipe CLI in-process; returns click's Result (exit_code, output)."""
    from fdpipe.cli import main

    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke


def one_line_error(result, *says: str) -> str:
    """The project's refusal: exit 1 with one `Error: ...` line (`error: ...` from `store verify`, which lists
    each problem so) that says each of `says`, and no traceback. `result` is click's Result (the `cli` fixture's);
    returns its output for further checks."""
    out = result.output
    lines = out.strip().splitlines()
    assert result.exit_code == 1, out
    assert "Traceback" not in out and len(lines) == 1 and lines[0].lower().startswith("error: "), out
    for text in says:
        assert text in lines[0], out
    return out


# ------------------------------------------------------------------------------ shared by several test modules
TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DATA = TESTS / "data"  # files the tests read: recorded numbers, stores written by earlier fdpipe versions
BIN = Path(sys.executable).parent
STAGES = {"extract": "fdpipe.extract.loop.extract", "distill": "fdpipe.distill.train.distill",
          "finetune": "fdpipe.finetune.train.finetune", "analyze": "fdpipe.analyze.run.analyze"}


def store_kinds() -> list[tuple[str, str]]:
    """Every (layout, dtype) a store can be written in, from the tables that declare them, so that the tests of what
    each store must do cover a new layout or dtype without editing each list. pca-K stands for every K as pca-4
    (half the 8 channels of `store_settings`)."""
    from fdpipe.options import DTYPES
    from fdpipe.store.layouts import LAYOUTS

    return [(layout, dtype) for layout in LAYOUTS for dtype in (*DTYPES, "pca-4")]


STORE_KINDS = store_kinds()


def extract_cmd(data, out, *extra):
    return [str(BIN / "fdpipe"), "extract", "--teacher", "effnet-lite0", "--data", str(data), "--out", str(out),
            "--views", "2", "--image-size", "32", "--shard-size", "2", "--workers", "0", "--quiet", *extra]


KILLER = textwrap.dedent("""
    import os, signal, sys
    from fdpipe.store import fs
    when, target = sys.argv[1], sys.argv[2]
    orig_put, orig_commit = fs.StoreLocation.put_atomic, fs.StoreLocation.commit
    def put_atomic(self, rel, data):
        if when == "mid-write" and target in rel:
            tmp = self._tmp_name(rel)
            self.makedirs(rel.rpartition("/")[0])
            with self.fs.open(self.path(tmp), "wb") as f:
                whole = data if isinstance(data, bytes) else b"".join(bytes(p) for p in data)
                f.write(whole[: len(whole) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return orig_put(self, rel, data)
    def commit(self, tmp, rel):
        orig_commit(self, tmp, rel)
        if when == "after-commit" and target in rel:
            os.kill(os.getpid(), signal.SIGKILL)
    fs.StoreLocation.put_atomic, fs.StoreLocation.commit = put_atomic, commit
    from fdpipe.cli import main
    main(sys.argv[3:])
""")


def part_store(url: str, full, targets: np.ndarray, lo: int, hi: int, shard_size: int, layout: str, dtype: str):
    """A store of images [lo, hi) of the full store's images, numbered from 0, as an extraction of that part."""
    from fdpipe.store import shard_range

    settings = store_settings(layout, dtype, n=hi - lo, s=shard_size, v=full.views)
    rows = [r for s in range(-(-full.num_images // full.shard_size)) for r in shard_rows(full, s)]
    rows = [{**r, "image_idx": r["image_idx"] - lo} for r in rows if lo <= r["image_idx"] < hi]
    w = open_writer(url, settings, targets[lo:hi])
    v = full.views
    for shard in range(w.num_shards):
        a, b = shard_range(shard, w.s, w.n)
        w.write_stored(shard, *w.q.quantize(targets[lo + a:lo + b]), rows[a * v:b * v])
    assert w.try_finalize()


def randomized_zero_init(model, std: float):
    """The model in eval mode with its zero-initialised relative position tables and q/v biases drawn from
    N(0, std): tests of attention maths need them to matter."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "relative_position_bias_table" in name or name.endswith(("q_bias", "v_bias")):
                p.normal_(0, std)
    return model.eval()
