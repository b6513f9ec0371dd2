"""Where a store lives: a local path or any fsspec URL, and the few file operations the store needs.

Commits are "write to a temporary name, then rename": on a local disk that is an atomic rename, on object stores a
copy from a temporary key, so a reader never sees a partial file under its final name.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import fsspec
from fsspec.core import url_to_fs

from ..errors import StoreError

CHUNK = 1 << 22


@dataclass
class StoreLocation:
    """A store root: an fsspec filesystem plus the root path inside it."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.url = str(self.url).rstrip("/")
        try:
            self.fs, self.root = url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError) as e:
            raise StoreError(f"cannot open {self.url}: {e}") from None

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def zarr_url(self, rel: str) -> str:
        """URL of a sub-path for zarr.open_group(..., storage_options=...)."""
        return self.path(rel) if self.is_local else f"{self.url}/{rel}"

    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self.path(rel))

    def read_bytes(self, rel: str) -> bytes:
        return self.fs.cat_file(self.path(rel))

    def read_json(self, rel: str) -> Any:
        raw = self.read_bytes(rel)
        try:
            return json.loads(raw)
        except ValueError as e:
            raise StoreError(f"{self.path(rel)} is not valid JSON ({e}); the file is corrupt") from None

    def open(self, rel: str, mode: str = "rb") -> BinaryIO:
        return self.fs.open(self.path(rel), mode)

    def makedirs(self, rel: str) -> None:
        if self.is_local:
            self.fs.makedirs(self.path(rel), exist_ok=True)

    def put_atomic(self, rel: str, data: bytes) -> None:
        """Write `data` under a temporary name and move it into place."""
        tmp = self._tmp_name(rel)
        self.makedirs(rel.rpartition("/")[0])
        with self.fs.open(self.path(tmp), "wb") as f:
            f.write(data)
        self.commit(tmp, rel)

    def _tmp_name(self, rel: str) -> str:
        head, _, name = rel.rpartition("/")
        return f"{head}/.tmp-{uuid.uuid4().hex[:12]}-{name}" if head else f".tmp-{uuid.uuid4().hex[:12]}-{name}"

    def open_atomic(self, rel: str) -> "AtomicWriter":
        return AtomicWriter(self, rel)

    def commit(self, tmp: str, rel: str) -> None:
        self.fs.mv(self.path(tmp), self.path(rel))

    def remove(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.path(rel), recursive=True)

    def ls(self, rel: str) -> list[str]:
        """Names (not paths) directly under `rel`, or [] when it does not exist."""
        try:
            return sorted(p.rstrip("/").rpartition("/")[2] for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError:
            return []

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def sha256(self, rel: str) -> tuple[int, str]:
        """(bytes, sha256 hex) of a file, streamed."""
        h, n = hashlib.sha256(), 0
        with self.open(rel) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                n += len(chunk)
        return n, h.hexdigest()

    def du(self) -> int:
        return int(self.fs.du(self.root, total=True)) if self.exists() else 0


class AtomicWriter:
    """A writable file that appears under its final name only on a clean close, hashing what passes through."""

    def __init__(self, loc: StoreLocation, rel: str):
        self.loc, self.rel = loc, rel
        self.tmp = loc._tmp_name(rel)
        loc.makedirs(rel.rpartition("/")[0])
        self._f = loc.fs.open(loc.path(self.tmp), "wb")
        self._h = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self._h.update(data)
        self.bytes += len(data)
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._f.close()
        if exc_type is None:
            self.loc.commit(self.tmp, self.rel)
        else:
            self.loc.remove(self.tmp)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def open_url(url: str, mode: str = "rb", **storage_options: Any):
    return fsspec.open(url, mode, **storage_options)
