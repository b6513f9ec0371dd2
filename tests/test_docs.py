"""docs/store-format.md: its code blocks run as written (without fdpipe) against stores the tests make, and it names
every manifest field and index column a store has."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import STORE_KINDS, open_writer, shard_rows, store_settings, whitened
from fdpipe.store import StoreWriter, open_store, shard_range
from fdpipe.store.index import COLUMNS, SPAN_COLUMNS
from fdpipe.store.manifest import FORMAT_VERSION, canonical, checksum, fingerprint

DOC = Path(__file__).resolve().parents[1] / "docs" / "store-format.md"
PLACEHOLDER = 'STORE = "/path/to/store"'

# Appended to each snippet: its result, for comparison with fdpipe's own reading.
DUMP = """
import sys as _sys
assert "fdpipe" not in _sys.modules, "the snippet must not need fdpipe"
if "target" in dir():
    import numpy as _np, json as _json
    _np.save(_sys.argv[1] + ".npy", target)
    _json.dump(row, open(_sys.argv[1] + ".json", "w"))
    if "crop" in dir():
        _np.save(_sys.argv[1] + ".crop.npy", _np.asarray(crop))
    if "student_view" in dir():
        _np.save(_sys.argv[1] + ".view.npy", _np.asarray(student_view))
"""


def snippets() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 4 and all(PLACEHOLDER in b for b in blocks)
    return blocks


def needs(block: str) -> set[str]:
    """The layouts a block reads."""
    if "import zarr" in block:
        return {"zarr"}
    if "import webdataset" in block or 'm["layout"] == "wds"' in block:
        return {"wds"}
    return {"zarr", "wds"}


def run(block: str, store: Path, out: Path) -> subprocess.CompletedProcess:
    code = block.replace(PLACEHOLDER, f"STORE = {str(store)!r}") + DUMP
    return subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, cwd=out.parent)


def make_store_with_images(root: Path, layout: str, dtype: str) -> Path:
    """A small store whose index points at real image files (of the sizes the rows record)."""
    from fdpipe.viewcodec import StudentViews

    views = StudentViews.parse(32)  # format 4's student views: the snippets read one
    settings = store_settings(layout, dtype, n=5, s=2).replace(student_views=views)
    targets = whitened(np.random.default_rng(7), (5, 2, 4, 8))
    images = root / "images"
    url = root / f"{layout}-{dtype}"
    w = open_writer(str(url), settings, targets)
    rng = np.random.default_rng(0)
    for shard in range(w.num_shards):
        rows = shard_rows(settings, shard)
        for r in rows:
            path = images / f"{r['key']}.png"
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (r["orig_height"], r["orig_width"], 3), dtype=np.uint8)).save(path)
            r["source"] = str(path)
        a, b = shard_range(shard, w.s, w.n)
        pixels = [[views.encode(torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)) for _ in range(2)]
                  for _ in range(b - a)]
        w.write_stored(shard, *w.q.quantize(targets[a:b]), rows, student_views=pixels)
    assert w.try_finalize()
    return url


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("docs")
    return {(layout, dtype): make_store_with_images(root, layout, dtype) for layout, dtype in STORE_KINDS}


CASES = [(i, layout, dtype) for i, block in enumerate(snippets())
         for layout, dtype in STORE_KINDS if layout in needs(block)]


@pytest.mark.parametrize("which,layout,dtype", CASES)
def test_doc_snippets_run_as_written(stores, tmp_path, which, layout, dtype):
    from fdpipe.augment import AugmentationPlan, AugParams
    from fdpipe.data import decode_rgb

    block = snippets()[which]
    url = stores[(layout, dtype)]
    out = tmp_path / "out"
    p = run(block, url, out)
    assert p.returncode == 0, p.stderr
    if "target = " not in block:  # it checks what it reads itself, and says ok
        assert p.stdout.startswith("ok "), p.stdout
        return
    st = open_store(str(url))
    target = np.load(str(out) + ".npy")
    row = json.loads(Path(str(out) + ".json").read_text())
    want = next(it for it in st.iter_images() if it.image_idx == 2)
    assert target.dtype == np.float32
    if dtype.startswith("pca-"):  # numpy's product with the basis sums in another order than torch's
        assert np.allclose(target, want.targets[1], rtol=0, atol=1e-5)
    else:
        assert np.array_equal(target, want.targets[1])
    want_row = want.rows[1]
    if layout == "wds":  # params.json carries the 64-bit seed as a string (int64 JSON readers overflow on it)
        want_row = {k: v for k, v in want_row.items() if k not in SPAN_COLUMNS}  # and not where it lies in its tar
        want_row = {**want_row, "seed": str(want_row["seed"])}
    assert row == want_row
    if Path(str(out) + ".crop.npy").exists():  # the crop the doc takes is the one fdpipe replays
        image = decode_rgb(Path(row["source"]).read_bytes())
        ours = AugmentationPlan.apply(image, AugParams.from_dict(row), (224, 224), "bicubic")
        assert np.array_equal(np.load(str(out) + ".crop.npy"), np.asarray(ours))
    view = np.load(str(out) + ".view.npy")  # the stored student view, as fdpipe decodes it
    ours = st.student_views.decode(next(it for it in st.iter_stored() if it.image_idx == 2).student_views[1])
    assert np.array_equal(view, ours.permute(1, 2, 0).numpy())


def test_snippets_refuse_an_unknown_format_version(stores, tmp_path):
    for (layout, dtype), url in stores.items():
        if dtype != "int8":
            continue
        copy = tmp_path / layout
        shutil.copytree(url, copy)
        m = json.loads((copy / "manifest.json").read_text())
        m["format_version"] = FORMAT_VERSION + 1
        m["fingerprint"] = fingerprint(m)
        m["checksum"] = checksum(m)
        (copy / "manifest.json").write_bytes(canonical(m))
        for block in snippets():
            if layout in needs(block):
                p = run(block, copy, tmp_path / "out")
                assert p.returncode != 0 and "unknown store format: refuse it" in p.stderr


def test_the_doc_names_every_manifest_field_and_index_column(stores):
    text = DOC.read_text()
    m = open_store(str(stores[("zarr", "int8")])).manifest
    fields = set(m) | {f"{k}" for k in m["creator"]} | set(m["quantizer"]) | set(m["plan"]) | set(m["counts"])
    real_teacher = ("alias", "timm_name", "weights_sha256", "layer", "target", "pretrained_cfg", "image_size",
                    "tokens", "channels", "grid", "num_prefix_tokens", "precision")
    missing = sorted(f for f in fields | set(real_teacher) | set(COLUMNS) if f"`{f}`" not in text)
    assert not missing, f"docs/store-format.md does not mention {missing}"
    from fdpipe.store.manifest import FORMAT_VERSION

    assert f"format_version {FORMAT_VERSION})" in text.splitlines()[0]
    row = next(line for line in text.splitlines() if line.startswith("| `format_version`"))
    assert f"| `{FORMAT_VERSION}` (" in row, row  # the manifest table names the version writers write now


# ------------------------------------------------------------------------------------------------ README library API
README = Path(__file__).resolve().parents[1] / "README.md"


def readme_library_example() -> str:
    text = README.read_text().split("## Use a store in your own training loop", 1)[1]
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)[0]


def test_the_readme_links_resolve_inside_a_clone():
    root = README.parent
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [link for link in links if "://" not in link]
    assert local
    for link in local:
        target = (root / link).resolve()
        assert target.exists() and root in target.parents, f"README links to {link}, which a clone does not have"


def test_the_readme_and_the_makefile_give_the_same_suite_time():
    readme = re.search(r"^make test .*about (\d+) minutes", README.read_text(), flags=re.M)
    makefile = re.search(r"run the suite in about (\d+) minutes", (README.parent / "Makefile").read_text())
    assert readme and makefile and readme.group(1) == makefile.group(1), (readme, makefile)


def test_the_readme_library_example_is_short_and_uses_only_public_names():
    block = readme_library_example()
    assert len(block.strip().splitlines()) < 30
    import fdpipe

    used = set(re.findall(r"fdpipe\.(\w+)", block))
    assert used and used <= set(fdpipe.__all__), used - set(fdpipe.__all__)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["zarr", "wds"])
def test_the_readme_library_example_trains_a_plain_timm_model_from_a_store(tmp_path, layout):
    from click.testing import CliRunner

    from fdpipe.cli import main

    store = tmp_path / "store"
    r = CliRunner().invoke(main, ["extract", "--teacher", "effnet-lite0", "--data", "fashion-mnist", "--limit", "16",
                                  "--image-size", "64", "--views", "2", "--workers", "0", "--quiet", "--format",
                                  layout, "--out", str(store)])
    assert r.exit_code == 0, r.output
    code = f"STORE = {str(store)!r}\n" + readme_library_example()
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    losses = [float(line.rsplit(" ", 1)[1]) for line in p.stdout.splitlines() if line.startswith("epoch ")]
    assert len(losses) == 2 and all(np.isfinite(losses))
