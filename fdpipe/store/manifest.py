"""The manifest: what a store holds and how it was made.

`manifest.draft.json` is written first and holds only the settings, so a resumed run can refuse to mix settings.
`manifest.json` is written last; its presence means the store is complete. It is stored in one canonical form
(sorted keys, two-space indent) and carries a `checksum` over its own content, so any edit shows in `verify`.
The store `fingerprint` is the sha256 of the canonical manifest without the creation time: two stores with the same
fingerprint hold the same targets for the same images, whoever made them and when.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from typing import Any

from ..errors import StoreError

FORMAT = "fdpipe-store"
FORMAT_VERSION = 3  # 2: wds stores hold one tar per (shard, view); `codec` names the chunk compressor. 3: zarr chunks
# end in a crc32c (the codec zarr and tensorstore check on every read), and every file entry carries a crc32c that
# readers check as a wds tar streams
MANIFEST = "manifest.json"
DRAFT = "manifest.draft.json"

# Chunk compressors a store may use (zarr layout; wds members stay plain .npy so that webdataset decodes them).
CODECS = ("none", "zstd-1", "zstd-3", "lz4")
DEFAULT_CODEC = "none"

# Settings that must agree for a resumed run (and for a merge, minus the dataset).
SETTING_KEYS = (
    "format", "format_version", "layout", "teacher", "whitening", "plan", "target", "dtype", "quantizer",
    "num_images", "views", "shard_size", "target_shape", "data", "codec",
)
# What stores must share to be merged: same targets for any image, whatever the image set.
MERGE_KEYS = ("format_version", "layout", "teacher", "whitening", "plan", "target", "dtype", "quantizer",
              "target_shape")


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
    import timm
    import torch

    from .. import __version__

    return {
        "fdpipe": __version__, "torch": torch.__version__, "timm": timm.__version__,
        "python": platform.python_version(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def make_draft(settings: dict[str, Any]) -> dict[str, Any]:
    settings = {"codec": DEFAULT_CODEC, **settings}
    missing = [k for k in SETTING_KEYS if k not in settings and k not in ("format", "format_version")]
    if missing:
        raise ValueError(f"store settings lack {missing}")
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **{k: settings[k] for k in SETTING_KEYS
                                                                  if k in settings and k not in ("format", "format_version")}}


def make_final(draft: dict[str, Any], shards: list[dict[str, Any]], metadata_files: dict[str, Any],
               counts: dict[str, int], dataset_fingerprint: str) -> dict[str, Any]:
    m = dict(draft)
    m.update(shards=shards, metadata_files=metadata_files, counts=counts,
             dataset_fingerprint=dataset_fingerprint, creator=creator())
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
    if manifest.get("format") != FORMAT:
        raise StoreError(f"{where} is not an fdpipe store manifest (format={manifest.get('format')!r})")
    v = manifest.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION or v < 1:
        raise StoreError(
            f"{where} has format_version {v!r}, but this fdpipe reads versions 1 to {FORMAT_VERSION}; "
            "upgrade fdpipe to read it"
        )


def check_integrity(manifest: dict[str, Any], raw: bytes, where: str) -> None:
    """The file must be exactly its canonical form and its checksum must match its content."""
    if manifest.get("checksum") != checksum(manifest):
        raise StoreError(f"{where}: checksum mismatch; the manifest was modified or is corrupt")
    if raw != canonical(manifest):
        raise StoreError(f"{where}: the file is not in canonical form; the manifest was modified or is corrupt")
    if manifest.get("fingerprint") != fingerprint(manifest):
        raise StoreError(f"{where}: fingerprint mismatch; the manifest was modified or is corrupt")
