"""Writing a store: draft first, whole shards committed one by one, manifest last.

A writer owns whole shards (zarr v3 has no locks; two writers in one shard lose rows). Each shard's files go to
temporary names and are moved into place, then its `_progress` marker records their sizes and sha256. A resumed run
trusts what is committed: it skips this rank's shards whose marker is there and whose files have the sizes it
records (one listing of the store; checking the bytes is `fdpipe store verify`'s job, which at 5 TB is an hour of
hashing), and a complete store (manifest.json) is not looked into at all. Any rank that finds every shard committed
writes manifest.json.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from ..errors import StoreError
from . import basis, consolidated
from . import index as index_mod
from .contract import StoreSettings
from .fs import StoreLocation
from .layouts import layout_for
from .manifest import (DRAFT, FILE_DIRS, MANIFEST, canonical, check_settings, check_shard, check_version,
                       describe_value, first_difference, make_draft, make_final)
from .quantize import get_quantizer

PROGRESS = "_progress"


def progress_name(shard: int) -> str:
    return f"{PROGRESS}/shard-{shard:05d}.json"


def committed_markers(loc: StoreLocation) -> list[str]:
    """The marker names in _progress/, without temporary files a crashed writer may have left there."""
    return [n for n in loc.ls(PROGRESS) if n.startswith("shard-") and n.endswith(".json")]


def num_shards(num_images: int, shard_size: int) -> int:
    return max(1, math.ceil(num_images / shard_size))


def shard_range(shard: int, shard_size: int, num_images: int) -> tuple[int, int]:
    return shard * shard_size, min((shard + 1) * shard_size, num_images)


def shards_of_rank(n_shards: int, rank: int, world: int) -> list[int]:
    """Rank r owns shards i with i % world == r (DESIGN.md "Scale")."""
    return [i for i in range(n_shards) if i % world == rank]


# A zarr shard's index holds 16 bytes for every (image, view) cell of each array and is read whole when the shard is
# opened: without a bound, tiny targets (a pca-K store of a one-token teacher: a few bytes a view) would make shards
# of 10^8 images whose index alone is gigabytes (more than one pread returns).
MAX_DEFAULT_SHARD_IMAGES = 16384


def default_shard_size(bytes_per_image: int, target_bytes: int = 768 << 20) -> int:
    """Images per shard so that a shard holds about 0.5-1 GiB, and at most MAX_DEFAULT_SHARD_IMAGES."""
    return max(1, min(MAX_DEFAULT_SHARD_IMAGES, target_bytes // max(1, bytes_per_image)))


class StoreWriter:
    """Creates or resumes a store with fixed settings and commits whole shards."""

    def __init__(self, url: str, settings: StoreSettings, storage_options: dict | None = None, *,
                 role: str = "--out"):
        self.loc = StoreLocation(url, storage_options or {})
        self.role = role  # how the user named this location, for messages
        self.settings = settings
        self.draft = make_draft(settings.to_dict())
        self.q = get_quantizer(settings.dtype)
        self.n, self.v, self.s, self.layout = settings.num_images, settings.views, settings.shard_size, settings.layout
        self.num_shards = num_shards(self.n, self.s)
        self.targets_layout = layout_for(self.draft)(self.loc, self.draft, self.q)  # writes the target files

    # -------------------------------------------------------------------------------------------------- opening
    def open(self, shards: Iterable[int] | None = None) -> set[int]:
        """Write or check the draft; returns the shards already committed among `shards` (default: all of them),
        and every shard of a complete store. Committed: `is_committed`, against one listing of the store.

        While a local store is being written, this process holds its folder lock (shared by the ranks of one job),
        so a second writer is refused in one line instead of racing this one. A folder that holds only
        temporaries (`.tmp-*`, left by a crash during the first commit) counts as empty: the rerun resumes.
        """
        from ..locks import lock_folder
        from ..runtime import ranks_from_env
        from .fs import TMP_PREFIX
        from .manifest import MAX_SHARDS

        loc = self.loc
        if loc.exists(MANIFEST):
            self._check_same(loc.read_json(MANIFEST), MANIFEST)
            return set(range(self.num_shards))  # complete: nothing is written, so nothing needs checking
        else:
            for folder in (PROGRESS, *FILE_DIRS):
                loc.inside(folder)  # a folder linked out of the store is refused before any work, not at its commit
            if loc.is_local:
                self._lock = lock_folder(loc.root, f"{loc.url} is being written by another process (extract, "
                                         f"convert or merge); wait for it to finish, or choose another {self.role}",
                                         shared=ranks_from_env().world > 1)
            if loc.exists(DRAFT):
                self._check_same(loc.read_json(DRAFT), DRAFT)
            else:
                if loc.exists() and [n for n in loc.ls("") if not n.startswith(TMP_PREFIX)]:
                    raise StoreError(
                        f"{loc.url} exists and is not an fdpipe store; choose a new or empty directory for {self.role}"
                    )
                if self.num_shards > MAX_SHARDS:
                    raise StoreError(f"{loc.url}: {self.n:,} images in shards of {self.s:,} make {self.num_shards:,} "
                                     f"shards, more than the {MAX_SHARDS:,} a store may have; use larger shards "
                                     "(--shard-size)")
                try:
                    loc.put_atomic(DRAFT, canonical(self.draft))
                except OSError as e:
                    raise StoreError(f"cannot write to {loc.url}: {e.strerror or e}; choose a writable "
                                     f"{self.role}") from None
        for rel, data in self.targets_layout.metadata().items():
            if not loc.exists(rel):
                loc.put_atomic(rel, data)
        if self.q.rank:
            self._open_basis()
        sizes = loc.sizes()
        return {i for i in (range(self.num_shards) if shards is None else shards) if self.is_committed(i, sizes)}

    # ---------------------------------------------------------------------------------------------- pca basis
    @property
    def needs_basis(self) -> bool:
        """A pca-K store whose basis is not in the store yet: `put_basis` before any shard."""
        return bool(self.q.rank) and self.q.basis is None

    def _open_basis(self) -> None:
        """Bind the quantizer to the store's basis when it is there (refusing a damaged one in one line); a store
        with committed shards and no basis is refused, since those shards cannot be read without it."""
        if self.loc.exists(basis.NAME):
            self.q = self.q.with_basis(basis.read(self.loc, self.settings.target_shape[-1], self.q.rank))
        elif committed_markers(self.loc):
            raise basis.missing(self.loc.path(basis.NAME))

    def put_basis(self, fitted: np.ndarray) -> None:
        """Write the basis unless another writer (a rank of this job) got there first, then bind the quantizer to
        the file that is there, so that every writer quantizes against the same one."""
        self.loc.put_new(basis.NAME, basis.encode(fitted))
        self.q = self.q.with_basis(basis.read(self.loc, self.settings.target_shape[-1], self.q.rank))

    def _check_same(self, existing: dict[str, Any], name: str) -> None:
        old = {k: existing.get(k) for k in self.draft}
        old["data"] = self._same_data(old.get("data"))
        diff = first_difference(old, self.draft)
        if diff:
            fix = (f"finish it with the fdpipe that started it, or use another {self.role}"  # not a user setting
                   if diff.split(".")[0] in ("format_version", "quantizer") else
                   f"use the original settings to resume, or another {self.role}")
            raise StoreError(
                f"{self.loc.url} was made with other settings: {diff} is {describe_value(old, diff)!r} there, "
                f"{describe_value(self.draft, diff)!r} now; {fix}"
            )

    def _same_data(self, old: Any) -> Any:
        """The store's recorded data block, refused in one line naming both specs when it names other images than
        this run's. A spec recorded relative (by an earlier fdpipe, which kept --data as typed) resolves against
        the working directory, as it did then."""
        from ..data import absolute_spec

        new = self.draft.get("data")
        if not (isinstance(old, dict) and isinstance(new, dict)
                and isinstance(old.get("spec"), str) and isinstance(new.get("spec"), str)):
            return old
        if absolute_spec(old["spec"]) != absolute_spec(new["spec"]):
            raise StoreError(f"{self.loc.url} was started on the images at {absolute_spec(old['spec'])}, not "
                             f"{absolute_spec(new['spec'])}: resume with those images, or use another {self.role}")
        return {**old, "spec": new["spec"]}

    def is_committed(self, shard: int, sizes: dict[str, int] | None = None) -> bool:
        """The marker exists and every file it names has its recorded size, in `sizes` (the store's listing,
        `StoreLocation.sizes`; listed now when not given). The bytes are not read: a shard changed after its commit
        with its size kept is `fdpipe store verify`'s to catch."""
        rel = progress_name(shard)
        sizes = self.loc.sizes() if sizes is None else sizes
        if rel not in sizes:
            return False
        try:
            files = self.loc.read_json(rel)["files"]
            return bool(files) and all(sizes.get(f) == meta["bytes"] for f, meta in files.items())
        except (StoreError, KeyError, TypeError, AttributeError):
            return False

    # -------------------------------------------------------------------------------------------------- writing
    def write_stored(self, shard: int, values: np.ndarray, scales: np.ndarray | None, rows: list[dict[str, Any]],
                     images: list[tuple[str, bytes] | None] | None = None,
                     student_views: list[list[bytes]] | None = None) -> None:
        """Commit one whole shard of values quantized by the store's quantizer (`self.q`: extraction quantizes on
        the teacher's device), or copied as stored (convert and merge).

        values: [n, V, *target_shape] in the store's dtype; scales: [n, V, *target_shape[:-1]] float16 or None.
        rows:   n*V index rows, image-major, each with the index columns except `shard`.
        images: optional (extension, bytes) per image, embedded where the layout embeds images (wds).
        student_views: the V encoded student views of each image (b"" for a failed one), exactly when the store's
                       settings have student views.
        """
        start, stop = shard_range(shard, self.s, self.n)
        n = stop - start
        if values.shape[:2] != (n, self.v) or len(rows) != n * self.v:
            raise ValueError(f"shard {shard}: expected {n} images x {self.v} views, got {values.shape} / {len(rows)}")
        if values.dtype != np.dtype(self.q.stored_dtype) or (scales is None) == self.q.has_scales:
            raise ValueError(f"shard {shard}: values {values.dtype} / scales {scales is not None} do not match the "
                             f"quantizer {self.q.name}")
        if (student_views is None) != (self.settings.student_views is None) or (
                student_views is not None and [len(v) for v in student_views] != [self.v] * n):
            raise ValueError(f"shard {shard}: student views do not match the store's settings "
                             f"({self.settings.student_views})")
        spans = dict.fromkeys(index_mod.SPAN_COLUMNS)  # the layout's to record (a copied row's are its source's)
        rows = [index_mod.normalize(r, shard=shard, **spans) for r in rows]
        files = self.targets_layout.write_shard(shard, values, scales, rows, images, student_views)
        part = index_mod.encode(rows)
        files[index_mod.part_name(shard)] = self.loc.put_atomic(index_mod.part_name(shard), part)
        marker = {"shard": shard, "images": n, "rows": n * self.v,
                  "failed": sum(1 for r in rows[::self.v] if r.get("status") not in (None, "ok")), "files": files}
        self.loc.put_atomic(progress_name(shard), canonical(marker))

    # ------------------------------------------------------------------------------------------------- finishing
    def try_finalize(self) -> bool:
        """Write manifest.json when every shard is committed (by any rank); True when the store is complete."""
        if self.loc.exists(MANIFEST):
            return True
        if len(committed_markers(self.loc)) < self.num_shards:
            return False
        finalize(self.loc.url, self.loc.storage_options)
        return True


def finalize(url: str, storage_options: dict | None = None) -> dict[str, Any]:
    """Build manifest.json from the draft and every shard's marker; refuses while a shard is missing."""
    loc = StoreLocation(url, storage_options or {})
    if loc.exists(MANIFEST):
        return loc.read_json(MANIFEST)
    if not loc.exists(DRAFT):
        raise StoreError(f"{url} has no {DRAFT}: it is not an fdpipe store being written")
    draft = loc.read_json(DRAFT)
    check_version(draft, loc.path(DRAFT))
    check_settings(draft, loc.path(DRAFT))
    n_shards = num_shards(draft["num_images"], draft["shard_size"])
    missing = [i for i in range(n_shards) if not loc.exists(progress_name(i))]
    if missing:
        raise StoreError(
            f"{url}: {len(missing)} of {n_shards} shards are not committed (first: {missing[0]}); "
            "run `fdpipe extract` again to finish them"
        )
    shards, counts = [], {"images": 0, "rows": 0, "failed": 0}
    for i in range(n_shards):
        marker = loc.read_json(progress_name(i))
        check_shard(marker, draft, loc.path(progress_name(i)), "marker", i)
        shards.append({"shard": i, "images": marker["images"], "rows": marker["rows"], "files": marker["files"]})
        for k in counts:
            counts[k] += int(marker[k])
    meta = {}
    q = get_quantizer(draft["dtype"])
    for rel in [*layout_for(draft)(loc, draft, q).metadata(), *([basis.NAME] if q.rank else [])]:
        if not loc.exists(rel):
            raise StoreError(f"{url}: {rel} is missing; the store cannot be finished")
        nbytes, sha = loc.sha256(rel)
        meta[rel] = {"bytes": nbytes, "sha256": sha}
    # every shard is committed, so a temporary file left in a shard folder is debris of a crashed attempt
    loc.remove_stale_tmp([d for d in (PROGRESS, *FILE_DIRS) if loc.exists(d)])
    images, digest = _checked_index(loc, make_final(draft, shards, meta, counts, ""))
    manifest = make_final(draft, shards, meta, counts, digest)
    data = consolidated.encode(images)
    loc.put_atomic(consolidated.NAME, data)
    manifest = make_final(draft, shards, meta, counts, digest, {consolidated.ENTRY: consolidated.entry(data, manifest)})
    loc.put_atomic(MANIFEST, canonical(manifest))
    return manifest


def _checked_index(loc: StoreLocation, manifest: dict[str, Any]) -> tuple[Any, str]:
    """(the consolidated index, the dataset fingerprint) of every committed part, read once and checked as a
    replay would (store.consistency): a store is finished only with an index its readers accept."""
    from .consistency import scan_parts
    from .reader import Store

    scan = scan_parts(Store(loc, manifest))
    if scan.problem:
        raise StoreError(f"{scan.problem}; the store cannot be finished")
    if scan.failed != manifest["counts"]["failed"]:
        raise StoreError(f"{loc.url}: the index marks {scan.failed:,} images as failed, the shards' commit markers "
                         f"{manifest['counts']['failed']:,}; the store cannot be finished")
    return scan.images, scan.dataset_fingerprint
