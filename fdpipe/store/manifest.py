"""The manifest: what a store holds and how it was made.

`manifest.draft.json` is written first and holds only the settings, so a resumed run can refuse to mix settings.
`manifest.json` is written last; its presence means the store is complete. It is stored in one canonical form
(sorted keys, two-space indent) and carries a `checksum` over its own content, so any edit shows in `verify`.
The store `fingerprint` is the sha256 of the canonical manifest without the creation time: two stores with the same
fingerprint hold the same targets for the same images, whoever made them and when.

A store may come from another team or through object storage, so every field is checked before it is used
(`check_settings`, `check_manifest`): types, bounds and the counts that must agree, and file names that stay inside
the store. A bad field is one line naming the file and the field, never a traceback or an allocation sized by it.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import posixpath
import re
import reprlib
import time
from typing import Any

from ..errors import StoreError

FORMAT = "fdpipe-store"
FORMAT_VERSION = 8  # 2: wds stores hold one tar per (shard, view); `codec` names the chunk compressor. 3: zarr chunks
# end in a crc32c (the codec zarr and tensorstore check on every read), and every file entry carries a crc32c that
# readers check as a wds tar streams. 4: `student_views` (null, or the student pixels of every view, stored encoded
# beside its targets: fdpipe.viewcodec). 5: dtype `int4` (two channels a byte; a reader of version 4 would take its
# uint8 bytes for values, so the version says it is new). 6: dtype `int4-fixed` (int4's nibbles at one step for every
# token, no scales; a new quantizer). 7: dtype `pca-K` (int8 coefficients in the channel basis basis/pca.npz, a
# file listed in metadata_files: store.basis). 8: a wds store's index records each sample's byte range and crc32c
# in its tar (index.SPAN_COLUMNS), so a replay reads samples as zarr reads chunks; the tars are unchanged
MANIFEST = "manifest.json"
DRAFT = "manifest.draft.json"

# Chunk compressors a store may use (zarr layout; wds members stay plain .npy so that webdataset decodes them).
CODECS = ("none", "zstd-1", "zstd-3", "lz4")
DEFAULT_CODEC = "none"

from .layouts import LAYOUTS  # noqa: E402 - the layout table, which imports nothing heavy
TARGETS = ("features", "logits")
# Bounds of what a store may claim: far beyond any real store, small enough that nothing sized by a manifest's counts
# (ls's rows, a reader's arrays) can exhaust a machine.
from ..augment import MAX_VIEWS  # noqa: E402 - the plan's bound
MAX_SHARDS = 100_000  # 75 TB at the default 0.75 GiB; `store ls --json` of that many takes ~250 MB
MAX_TARGET_SIZE = 1 << 24  # values per view (CLIP-L features are 257 x 1024 = 263k)
# The folders a store's listed files live in (index parts, the zarr group, the wds tars).
FILE_DIRS = ("index", "targets.zarr", "wds", "basis")

# Settings that must agree for a resumed run (and for a merge, minus the dataset).
SETTING_KEYS = (
    "format", "format_version", "layout", "teacher", "whitening", "plan", "target", "dtype", "quantizer",
    "num_images", "views", "shard_size", "target_shape", "data", "codec", "student_views",
)
# What stores must share to be merged: same targets for any image, whatever the image set.
MERGE_KEYS = ("format_version", "layout", "teacher", "whitening", "plan", "target", "dtype", "quantizer",
              "target_shape", "student_views")


def canonical(obj: Any) -> bytes:
    """The one serialisation used for hashing and for the files themselves."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True, allow_nan=False) + "\n").encode()


def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest without its time, checksum and fingerprint."""
    body = {k: v for k, v in manifest.items() if k not in ("checksum", "fingerprint")}
    body["creator"] = {k: v for k, v in body.get("creator", {}).items() if k != "time"}
    return _sha(body)


def checksum(manifest: dict[str, Any]) -> str:
    return _sha({k: v for k, v in manifest.items() if k != "checksum"})


def creator() -> dict[str, Any]:
    """Who wrote the store. timm's version comes from its package metadata: importing timm to read it cost a
    finalize 1-2 s."""
    from importlib.metadata import version

    import torch

    from .. import __version__

    return {
        "fdpipe": __version__, "torch": torch.__version__, "timm": version("timm"),
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def make_draft(settings: dict[str, Any]) -> dict[str, Any]:
    settings = {"codec": DEFAULT_CODEC, "student_views": None, **settings}
    missing = [k for k in SETTING_KEYS if k not in settings and k not in ("format", "format_version")]
    if missing:
        raise ValueError(f"store settings lack {missing}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **{k: settings[k] for k in SETTING_KEYS
                                                                  if k in settings and k not in ("format", "format_version")}}


def make_final(draft: dict[str, Any], shards: list[dict[str, Any]], metadata_files: dict[str, Any],
               counts: dict[str, int], dataset_fingerprint: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    m = dict(draft)
    m.update(shards=shards, metadata_files=metadata_files, counts=counts,
             dataset_fingerprint=dataset_fingerprint, creator=creator(), **(extra or {}))
    m["fingerprint"] = fingerprint(m)
    m["checksum"] = checksum(m)
    return m


def first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    """Dotted name of the first field where two settings trees differ, or None when they agree."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{prefix}{k}"
            d = first_difference(a[k], b[k], f"{prefix}{k}.")
            if d:
                return d
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return prefix.rstrip(".") or "value"
        for i, (x, y) in enumerate(zip(a, b)):
            d = first_difference(x, y, f"{prefix}{i}.")
            if d:
                return prefix.rstrip(".")
        return None
    return None if a == b else (prefix.rstrip(".") or "value")


def describe_value(tree: dict[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return None
    return node


def check_version(manifest: dict[str, Any], where: str) -> None:
    if not isinstance(manifest, dict):
        raise StoreError(f"{where} holds a JSON {type(manifest).__name__}, not a manifest object; the file is corrupt")
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{where} is not an fdpipe store manifest (format={_show(manifest.get('format'))})")
    v = manifest.get("format_version")
    if type(v) is not int or v > FORMAT_VERSION or v < 1:
        raise StoreError(
            f"{where} has format_version {_show(v)}, but this fdpipe reads versions 1 to {FORMAT_VERSION}; "
            "upgrade fdpipe to read it"
        )


def check_integrity(manifest: dict[str, Any], raw: bytes, where: str) -> None:
    """The file must be exactly its canonical form, its checksum must match its content, and every field must be
    well-formed (`check_manifest`): a checksum proves only that nobody changed the file since it was written."""
    if manifest.get("checksum") != checksum(manifest):
        raise StoreError(f"{where}: checksum mismatch; the manifest was modified or is corrupt")
    try:
        canon = canonical(manifest)
    except ValueError:  # NaN or Infinity, which the canonical form cannot hold
        canon = None
    if raw != canon:
        raise StoreError(f"{where}: the file is not in canonical form; the manifest was modified or is corrupt")
    check_manifest(manifest, where)
    if manifest.get("fingerprint") != fingerprint(manifest):
        raise StoreError(f"{where}: fingerprint mismatch; the manifest was modified or is corrupt")


# ------------------------------------------------------------------------------------------------- validation
_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX8 = re.compile(r"[0-9a-f]{8}")
_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 40, 40, 4, 3, 2


def _show(value: Any) -> str:
    """A hostile value in a message: short, and on one line."""
    return _short.repr(value)


def _bad(where: str, name: str, problem: str) -> StoreError:
    return StoreError(f"{where}: {name} {problem}; the store is damaged or was not written by fdpipe")


_JSON_NAMES = {dict: "object", list: "list", str: "string", int: "integer", float: "number", type(None): "null"}


def _get(tree: dict[str, Any], key: str, where: str, name: str, kind: type | tuple[type, ...] | None = None) -> Any:
    """tree[key], refused in one line when it is missing or (given `kind`) of another JSON type."""
    if key not in tree:
        raise _bad(where, name, "is missing")
    value = tree[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if kind is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise _bad(where, name, f"is {_show(value)}, not {' or '.join(_JSON_NAMES.get(k, k.__name__) for k in kinds)}")
    return value


def _int(tree: dict[str, Any], key: str, where: str, name: str, lo: int = 0, hi: int | None = None) -> int:
    value = _get(tree, key, where, name)
    if type(value) is not int or value < lo or (hi is not None and value > hi):
        span = f"from {lo:,} to {hi:,}" if hi is not None else f"of at least {lo:,}"
        raise _bad(where, name, f"is {_show(value)}, not an integer {span}")
    return value


def _finite(value: Any, where: str, name: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value):
        raise _bad(where, name, f"is {_show(value)}, not a finite number")
    return float(value)


def _choice(tree: dict[str, Any], key: str, choices: tuple[str, ...], where: str, what: str) -> str:
    value = tree.get(key)
    if value not in choices or not isinstance(value, str):
        if key not in tree:
            raise _bad(where, key, "is missing")
        _unknown(where, what, value, choices)
    return value


def _unknown(where: str, what: str, value: Any, choices: tuple[str, ...]) -> None:
    raise StoreError(f"{where}: unknown {what} {_show(value)} (this fdpipe reads {', '.join(choices)}); "
                     "upgrade fdpipe, or the store is damaged")


def name_problem(rel: Any) -> str | None:
    """Why `rel` cannot name a file of a store, or None: names are relative, normalised ('a/b', never '/a', './a',
    'a//b' or '../a') and inside the store's folders, so nothing reads or writes outside the store."""
    if not isinstance(rel, str) or not rel:
        return "is not a file name"
    if any(ord(ch) < 32 for ch in rel) or "\\" in rel:
        return "holds a control character or a backslash"
    if rel.startswith("/") or posixpath.normpath(rel) != rel or ".." in rel.split("/"):
        return "is not a normalised relative path inside the store"
    if rel.split("/", 1)[0] not in FILE_DIRS or "/" not in rel:
        return f"is not under the store's {', '.join(d + '/' for d in FILE_DIRS)}"
    return None


def check_files(files: Any, where: str, name: str, crc: bool = False) -> None:
    """{relative name: {"bytes", "sha256"}} of a manifest or a commit marker; with `crc` (a format-3 shard's files)
    each also has the "crc32c" its readers check: a format-3 store without its checksums is not one."""
    if not isinstance(files, dict):
        raise _bad(where, name, f"is {_show(files)}, not an object of file names")
    for rel, meta in files.items():
        field = f"{name}[{_show(rel)}]"
        problem = name_problem(rel)
        if problem:
            raise _bad(where, field, problem)
        if not isinstance(meta, dict):
            raise _bad(where, field, f"is {_show(meta)}, not an object with bytes and sha256")
        _int(meta, "bytes", where, f"{field}.bytes")
        sha = _get(meta, "sha256", where, f"{field}.sha256", str)
        if not _HEX64.fullmatch(sha):
            raise _bad(where, f"{field}.sha256", f"is {_show(sha)}, not 64 lowercase hex digits")
        if crc or "crc32c" in meta:
            value = _get(meta, "crc32c", where, f"{field}.crc32c", str)
            if not _HEX8.fullmatch(value):
                raise _bad(where, f"{field}.crc32c", f"is {_show(value)}, not 8 lowercase hex digits")


def check_settings(s: Any, where: str) -> None:
    """The settings a draft pins (and a manifest repeats): known names, integers within bounds, counts that agree.

    Bounds: at most MAX_VIEWS views, MAX_SHARDS shards and MAX_TARGET_SIZE values per view.
    """
    if not isinstance(s, dict):
        raise StoreError(f"{where} holds a JSON {type(s).__name__}, not an object; the file is corrupt")
    from .quantize import QUANTIZERS, known_dtype

    _choice(s, "layout", LAYOUTS, where, "layout")
    target = _choice(s, "target", TARGETS, where, "target")
    if "dtype" not in s:
        raise _bad(where, "dtype", "is missing")
    if not known_dtype(s["dtype"]):  # a name of QUANTIZERS, or pca-K
        _unknown(where, "dtype", s["dtype"], (*QUANTIZERS, "pca-K"))
    if "codec" in s:
        _choice(s, "codec", CODECS, where, "codec")
    n = _int(s, "num_images", where, "num_images", 1)
    views = _int(s, "views", where, "views", 1, MAX_VIEWS)
    size = _int(s, "shard_size", where, "shard_size", 1)
    shards = -(-n // size)
    if shards > MAX_SHARDS:
        raise _bad(where, "num_images", f"is {n:,}: in shards of {size:,} that is {shards:,} shards, more than "
                                        f"the {MAX_SHARDS:,} a store may have")
    shape = _get(s, "target_shape", where, "target_shape", list)
    if len(shape) not in (1, 2) or any(type(d) is not int or d < 1 for d in shape):
        raise _bad(where, "target_shape", f"is {_show(shape)}, not [T, C] or [K] of positive integers")
    if math.prod(shape) > MAX_TARGET_SIZE:
        raise _bad(where, "target_shape", f"is {shape}: more than {MAX_TARGET_SIZE:,} values per view")
    for key in ("teacher", "plan", "data", "quantizer"):
        _get(s, key, where, key, dict)
    _get(s, "whitening", where, "whitening", (dict, type(None)))
    _check_plan(s["plan"], views, where)
    _check_student_views(s.get("student_views"), where)
    data = s["data"]
    if data.get("spec") is not None:
        _get(data, "spec", where, "data.spec", str)
    if data.get("limit") is not None:
        _int(data, "limit", where, "data.limit")
    if target == "features":
        t = s["teacher"]
        tokens = _int(t, "tokens", where, "teacher.tokens", 1)
        channels = _int(t, "channels", where, "teacher.channels", 1)
        _int(t, "num_prefix_tokens", where, "teacher.num_prefix_tokens", 0, tokens)
        grid = _get(t, "grid", where, "teacher.grid", list)
        if len(grid) != 2 or any(type(g) is not int or g < 1 for g in grid):
            raise _bad(where, "teacher.grid", f"is {_show(grid)}, not [rows, columns] of positive integers")
        if shape != [tokens, channels]:
            raise _bad(where, "target_shape", f"is {shape}, but the teacher gives {tokens} tokens x {channels} "
                                              "channels")


def _check_plan(plan: dict[str, Any], views: int, where: str) -> None:
    _get(plan, "policy", where, "plan.policy", str)
    if "policy_version" in plan:
        _int(plan, "policy_version", where, "plan.policy_version", 1)
    _int(plan, "seed", where, "plan.seed")
    if _int(plan, "views", where, "plan.views", 1) != views:
        raise _bad(where, "plan.views", f"is {plan['views']}, but the store has {views} views")
    for key, hi in (("scale", 1.0), ("ratio", math.inf)):
        pair = _get(plan, key, where, f"plan.{key}", list)
        if len(pair) != 2:
            raise _bad(where, f"plan.{key}", f"is {_show(pair)}, not [MIN, MAX]")
        lo, top = (_finite(x, where, f"plan.{key}[{i}]") for i, x in enumerate(pair))
        if not 0 < lo <= top <= hi:
            raise _bad(where, f"plan.{key}", f"is {_show(pair)}, not 0 < MIN <= MAX{' <= 1' if hi == 1 else ''}")
    if not 0 <= _finite(_get(plan, "flip_p", where, "plan.flip_p"), where, "plan.flip_p") <= 1:
        raise _bad(where, "plan.flip_p", f"is {_show(plan['flip_p'])}, not a probability")


def _check_student_views(d: Any, where: str) -> None:
    """`student_views`: null (absent before format 4), or what fdpipe.viewcodec.StudentViews reads."""
    if d is None:
        return
    from ..viewcodec import CODECS as VIEW_CODECS, INTERPOLATIONS, MAX_SIZE, StudentViews

    if not isinstance(d, dict):
        raise _bad(where, "student_views", f"is {_show(d)}, not an object or null")
    _int(d, "size", where, "student_views.size", 1, MAX_SIZE)
    _choice(d, "codec", VIEW_CODECS, where, "view codec")
    _choice(d, "interpolation", INTERPOLATIONS, where, "view interpolation")
    if d.get("quality") is not None:
        _int(d, "quality", where, "student_views.quality", 1, 100)
    try:
        StudentViews.from_dict(d)
    except (ValueError, KeyError) as e:
        raise _bad(where, "student_views", str(e)) from None


def check_shard(entry: Any, settings: dict[str, Any], where: str, name: str, shard: int | None = None) -> int:
    """One shard's entry in a manifest (or its commit marker): its number, counts that agree with the settings,
    and its files (the index part among them). Returns the shard number."""
    if not isinstance(entry, dict):
        raise _bad(where, name, f"is {_show(entry)}, not an object")
    n, size, views = settings["num_images"], settings["shard_size"], settings["views"]
    i = _int(entry, "shard", where, f"{name}.shard", 0, -(-n // size) - 1)
    if shard is not None and i != shard:
        raise _bad(where, f"{name}.shard", f"is {i}, expected {shard} (shards are listed in order)")
    images = min(size, n - i * size)
    for key, want in (("images", images), ("rows", images * views)):
        if _int(entry, key, where, f"{name}.{key}") != want:
            raise _bad(where, f"{name}.{key}", f"is {entry[key]:,}, but shard {i} holds {want:,}")
    if "failed" in entry:
        _int(entry, "failed", where, f"{name}.failed", 0, images)
    check_files(_get(entry, "files", where, f"{name}.files"), where, f"{name}.files",
                crc=type(settings.get("format_version")) is int and settings["format_version"] >= 3)
    part = f"index/part-{i:05d}.parquet"
    if part not in entry["files"]:
        raise _bad(where, f"{name}.files", f"does not list {part}")
    return i


def check_manifest(m: dict[str, Any], where: str) -> None:
    """Every field of a complete store's manifest, before anything uses one (see check_settings for the bounds)."""
    check_settings(m, where)
    n, views = m["num_images"], m["views"]
    shards = _get(m, "shards", where, "shards", list)
    want = -(-n // m["shard_size"])
    if len(shards) != want:
        raise _bad(where, "shards", f"lists {len(shards):,} shards, but {n:,} images in shards of "
                                    f"{m['shard_size']:,} make {want:,}")
    for i, entry in enumerate(shards):
        check_shard(entry, m, where, f"shards[{i}]", i)
    check_files(_get(m, "metadata_files", where, "metadata_files"), where, "metadata_files")
    counts = _get(m, "counts", where, "counts", dict)
    for key, want in (("images", n), ("rows", n * views)):
        if _int(counts, key, where, f"counts.{key}") != want:
            raise _bad(where, f"counts.{key}", f"is {counts[key]:,}, expected {want:,}")
    _int(counts, "failed", where, "counts.failed", 0, n)
    for key in ("fingerprint", "checksum", "dataset_fingerprint"):
        _get(m, key, where, key, str)
    _get(m, "creator", where, "creator", dict)
    if m.get("consolidated_index") is not None:  # since finalize writes one (store.consolidated)
        from .consolidated import ENTRY, NAME

        rec = _get(m, ENTRY, where, ENTRY, dict)
        if rec.get("file") != NAME:
            raise _bad(where, f"{ENTRY}.file", f"is {_show(rec.get('file'))}, not {NAME}")
        _int(rec, "bytes", where, f"{ENTRY}.bytes")
        for key in ("sha256", "checked"):
            if not _HEX64.fullmatch(_get(rec, key, where, f"{ENTRY}.{key}", str)):
                raise _bad(where, f"{ENTRY}.{key}", f"is {_show(rec[key])}, not 64 lowercase hex digits")
