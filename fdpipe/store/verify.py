"""`fdpipe store verify`: every file re-hashed (sha256 and crc32c), counts, shapes and index rows compared (with the
cross-references of store.consistency), and with --deep every crop box against the plan and every target decoded:
finite, whitened, not all of them zero, and a failed image's all NaN; for wds every sample's params.json against its index
row (the reader checks it).

The manifest's fields and file names are checked when the store opens (manifest.check_manifest), so verify never
hashes a file outside the store; a local file that is a link leading out of it is reported, not read.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch

from ..errors import StoreError
from . import consolidated
from .consistency import Scan, box_problems, index_problems, scan_parts
from .degenerate import ShareMeter, zero_views
from .reader import Store, open_store

WHITENED_TOL = 0.05


def _check_files(store: Store) -> Iterator[str]:
    m = store.manifest
    files = [(None, rel, meta) for rel, meta in m.get("metadata_files", {}).items()]
    if m.get(consolidated.ENTRY):
        files.append((None, consolidated.NAME, m[consolidated.ENTRY]))
    files += [(s["shard"], rel, meta) for s in m["shards"] for rel, meta in s["files"].items()]
    for shard, rel, meta in files:
        where = f"shard {shard}: {rel}" if shard is not None else rel
        if not store.loc.exists(rel):
            yield f"{where}: missing"
            continue
        if store.loc.escape(rel):
            yield f"{where}: a link that leads outside the store; refusing to read it"
            continue
        got = store.loc.digest(rel, meta["bytes"])
        if got["bytes"] != meta["bytes"]:
            yield f"{where}: {got['bytes']} bytes, manifest says {meta['bytes']}"
        elif got["sha256"] != meta["sha256"]:
            yield f"{where}: sha256 mismatch (the file is corrupt)"
        elif "crc32c" in meta and got["crc32c"] != meta["crc32c"]:  # what readers check: it must agree too
            yield f"{where}: crc32c {got['crc32c']}, manifest says {meta['crc32c']} (the manifest was altered)"


def _check_index(store: Store, scan: Scan) -> Iterator[str]:
    """The index rows against the manifest: counts, order, crop boxes and keys (index.check_part), seeds against the
    plan, failed images against the counts, the dataset fingerprint (consistency.index_problems), from `scan`, which
    read each part once."""
    yield from index_problems(store, scan)


def _check_consolidated(store: Store, scan: Scan) -> Iterator[str]:
    """The consolidated index, which a replay reads instead of the parts, against them: current (its record of
    what it was checked against is the manifest's), and row for row what they hold. Last, so that a change the
    checks before it can name more precisely (a moved crop box, a view's targets) is named so."""
    if consolidated.ENTRY not in store.manifest:
        return
    table, why = consolidated.problem(store.manifest, store.loc.read_bytes)
    where = store.loc.path(consolidated.NAME)
    if why:
        yield (f"{where} {why}; the store was changed after it was finished (its checksums recomputed): extract it "
               "again, or take it from its source")
    elif (bad := consolidated.first_difference(table, scan.images)) is not None:
        yield (f"{where}: image {bad} ({table.column('key')[bad].as_py()!r}) is not what the index parts record "
               "for it; the consolidated index was altered")


def _check_shape(store: Store) -> Iterator[str]:
    """The layout's own files beyond their checksums (a zarr array's shape against the manifest)."""
    return store.targets_layout.problems()


def _check_ranges(store: Store, chunk: int = 32) -> Iterator[str]:
    """A wds store of format 8: every sample read by its byte range in the index, as a replay reads it, is the one
    its tar streams (the index's ranges and the tars were not altered apart); `chunk` samples a read."""
    if not store.reads_ranges:
        return
    for shard in range(store.num_shards):
        for view in range(store.views):
            streamed = list(store.iter_view(shard, view))
            for a in range(0, len(streamed), chunk):
                try:
                    values, scales, student = store.read_samples([(shard, view, j)
                                                                  for j in range(a, min(a + chunk, len(streamed)))])
                except StoreError as e:
                    yield str(e)
                    return
                for k, it in enumerate(streamed[a:a + chunk]):
                    same = values[k].tobytes() == it.values.tobytes() and (
                        scales is None or scales[k].tobytes() == it.scales.tobytes()) and (
                        student is None or student[k] == (it.student_view or b""))
                    if not same:
                        yield (f"shard {shard}: image {it.image_idx} ({it.key!r}) view {view}: its byte range in the "
                               "index holds another sample than its tar streams; the index was altered")
                        return


def _check_values(store: Store, whitened: bool, meter: ShareMeter) -> Iterator[str]:
    """Every ok view's targets finite and (features) whitened, not all of them zero, and a failed image's all NaN;
    each image's tokens sampled into `meter`; every ok view's stored student view (format 4) decodes to its size.

    Whitened means a token's mean within WHITENED_TOL of 0 and its variance of 1, widened by what its step s allows:
    int8 stores each channel within e = s/2 of its value (the quantizer clips only a few channels, and only when
    that costs less), so the stored mean may be off by e and the variance by 2e + e^2; int4, which clips the tails
    of dense tokens, within e = s in the mean, s its scale or int4-fixed's one step (`Quantizer.mean_error`).
    The int8 bound is reached: when most of a token's channels share its minimum and the minimum sits half a step
    from 0, they all round the same way (effnet-lite0's head: mean 0.09 at s = 0.19), and no step does better
    without clipping the maximum.
    """
    views = zeros = 0
    for it in store.iter_stored():
        ok = np.array([r["status"] in (None, "ok") for r in it.rows])
        x = store.quantizer.dequantize(it.values, it.scales)
        where = f"shard {it.rows[0]['shard']}: image {it.image_idx} ({it.key!r})"
        for v, data in enumerate(it.student_views or []):
            try:
                if ok[v]:
                    store.student_views.decode(data)
            except ValueError as e:
                yield f"{where} view {v}: its stored student view {e}"
        if np.isfinite(x[~ok]).any():  # a failed image's targets are the fill value, NaN
            yield f"{where} is recorded as failed (status error) but holds targets; the index was altered"
            continue
        x = x[ok]
        if not np.isfinite(x).all():
            yield f"{where} has non-finite targets"
            continue
        views += len(x)
        zeros += len(zero_views(x))
        meter.add(torch.from_numpy(x))
        if whitened and x.size:
            off = store.quantizer.mean_error(None if it.scales is None else it.scales[ok])
            mean, var = x.mean(-1), x.var(-1)
            # a fixed step clips every token's tails at 2.6 of its unit deviation, so a sparse token keeps less
            # variance: only its upper bound holds there
            low = np.inf if store.quantizer.whitened_only else WHITENED_TOL + 2 * off + off ** 2
            bad = (np.abs(mean) > WHITENED_TOL + off) | (
                ((var - 1 > WHITENED_TOL + 2 * off + off ** 2) | (1 - var > low)) & (var > 1e-3))
            if bad.any():
                yield (f"shard {it.rows[0]['shard']}: image {it.image_idx} ({it.key!r}) is not whitened "
                       f"(token mean {float(mean.flat[np.argmax(bad)]):.3f}, var {float(var.flat[np.argmax(bad)]):.3f})")
    if views and zeros == views:  # a constant image may give one (a ReLU layer's zeros, whitened), never a whole store
        yield f"{store.url}: all {views:,} decoded views have all-zero targets; the values were overwritten"


def verify_store(url: str, storage_options: dict | None = None, deep: bool = False,
                 cache_dir: str | None = None, on_warning: Callable[[str], None] | None = None
                 ) -> tuple[Store | None, list[str]]:
    """All problems found, each naming the shard and file; an empty list means the store is intact.

    Files are hashed as they are in the store (never from the read cache); `cache_dir` serves the deep decoding.
    With `deep`, `on_warning` gets a line about targets that are valid but degenerate (fdpipe.store.degenerate).
    """
    try:
        store = open_store(url, storage_options, cache_dir)
    except StoreError as e:
        return None, [str(e)]
    problems = list(_check_files(store))  # each check only once the ones before it found nothing
    if problems:
        return store, problems
    scan = scan_parts(store)
    problems = list(_check_index(store, scan)) or list(_check_shape(store))
    if problems:
        return store, problems
    meter = ShareMeter()
    if deep:
        problems += box_problems(store)
        if problems:
            return store, problems
        whitened = bool(store.manifest.get("whitening")) and store.manifest.get("target") == "features"
        problems += _check_values(store, whitened, meter)
        if not problems:
            problems += _check_ranges(store)
    if not problems:
        problems += _check_consolidated(store, scan)
    warning = meter.warning()
    if warning and on_warning is not None and not problems:  # a refused store: its one line says why
        on_warning(warning)
    return store, problems


def describe(store: Store) -> dict[str, Any]:
    """What `fdpipe store info` prints."""
    m, t = store.manifest, store.teacher
    return {
        "store": store.url, "complete": True, "layout": store.layout, "fingerprint": store.fingerprint,
        "teacher": f"{t.alias or t.timm_name} ({t.timm_name})", "layer": t.layer,
        "precision": t.precision or "unrecorded",  # the teacher's arithmetic (fp32 or bf16), since issue 24
        "target": m["target"], "plan": m["plan"], "images": store.num_images, "views": store.views,
        "failed images": m["counts"]["failed"], "shards": store.num_shards, "shard size": store.shard_size,
        "T": t.tokens, "C": t.channels, "grid": list(t.grid),
        "prefix tokens": t.num_prefix_tokens, "target shape": list(store.target_shape),
        "dtype": m["dtype"], "size on disk": store.data_bytes() + sum(
            f["bytes"] for s in m["shards"] for rel, f in s["files"].items() if rel.startswith("index/")),
        "bytes per view": round(store.bytes_per_view(), 1),
    }
