"""Where a store lives: a local path or any fsspec URL, and the few file operations the store needs.

Commits are "write to a temporary name, then rename": on a local disk that is an atomic rename, on object stores an
upload to a temporary key and a server-side copy, so a reader never sees a partial file under its final name (an S3
object appears only once its upload is complete, and the copy is of a complete object).

Remote stores get bounded retries and timeouts by default (an unreachable endpoint fails in seconds with one line,
not a hang), and every failure of the remote filesystem becomes a StoreError naming the URL and what to do. Reads
can go through a local whole-file cache (fsspec's simplecache), so repeated epochs over a remote wds store download
each shard once.
"""

from __future__ import annotations

import copy
import errno
import functools
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator, Sequence, TypeVar

import fsspec
import numpy as np
from fsspec.core import split_protocol, url_to_fs

from ..errors import StoreError
from ..files import RefusedFileError, check_regular, open_regular, read_regular, show_bytes, write_pieces

CHUNK = 1 << 22
# The most a manifest, draft or commit marker may hold. A real manifest takes about 500 bytes per zarr shard and
# 200 per wds tar (16 MiB: 35,000 zarr shards, 9,000 wds shards of 8 views), and parsing it about 3 bytes of memory
# per byte; a hostile one of tiny nested lists takes 40 (a 300 MB manifest took 2.4 GB; 16 MiB stays under 0.7 GB).
MAX_JSON_BYTES = 16 << 20
TMP_PREFIX = ".tmp-"

# Defaults for S3 (s3fs/botocore) that the user's --storage-options override key by key. Retries multiply: botocore
# makes `max_attempts` tries of a request and s3fs repeats a request that timed out S3_RETRIES times, so a refused
# connection fails in about 2 s, a black-holed address in about 2 x connect_timeout, and a server that accepts but
# never answers in about a minute (S3_RETRIES x max_attempts x read_timeout, with aiobotocore's waits), instead of
# the many minutes of botocore's defaults. read_timeout bounds a silence, not a download: big shards still stream.
S3_DEFAULTS: dict[str, Any] = {
    "config_kwargs": {"connect_timeout": 5, "read_timeout": 10, "retries": {"max_attempts": 2, "mode": "standard"}},
    # other processes (ranks) write markers: listings must not come from a stale in-process cache
    "use_listings_cache": False,
}
S3_RETRIES = 2  # s3fs's own loop; it also retries a download cut off mid-body, which botocore does not
# A deadline on every call into an async filesystem (s3fs), in seconds: read_timeout bounds a silent read, but a
# request body sent to a server that stopped reading blocks forever (an upload to a stalled endpoint hung > 600 s).
# `call_timeout` in --storage-options overrides it; one 50 MiB multipart part has all of it.
CALL_TIMEOUT = 120.0

F = TypeVar("F", bound=Callable[..., Any])


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def effective_options(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any]:
    """The storage options used for `url`: the user's, over fdpipe's defaults for that protocol."""
    protocol = (split_protocol(str(url))[0] or "file").lower()
    so = dict(storage_options or {})
    return _merge(S3_DEFAULTS, so) if protocol in ("s3", "s3a") else so


def check_local_store(url: str | None) -> None:
    """Refuse a local store path that does not exist, in open_store's words, with the stdlib alone: the CLI asks
    before it imports zarr, pyarrow and torch. URLs are left to open_store."""
    url = "" if url is None else str(url)
    if url and "://" not in url and "::" not in url and not os.path.lexists(os.path.expanduser(url)):
        raise StoreError(f"no store at {url}: the path does not exist")


def _connection_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    try:
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError, NoCredentialsError

        types += [BotoConnectionError, HTTPClientError, NoCredentialsError]
    except ImportError:  # pragma: no cover - s3fs not installed
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError]
    except ImportError:  # pragma: no cover
        pass
    try:
        from fsspec.exceptions import FSTimeoutError

        types.append(FSTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def with_deadline(fs: fsspec.AbstractFileSystem, seconds: float) -> None:
    """Give every blocking call of an async filesystem instance a deadline (fsspec's own `sync(..., timeout=)`,
    which cancels the request and raises FSTimeoutError). The instance may be fsspec's cached one, shared."""
    import inspect

    from fsspec.asyn import AsyncFileSystem

    if not isinstance(fs, AsyncFileSystem):
        return
    plain = fs.__dict__.setdefault("_fdpipe_sync", {})  # the sync twins as fsspec made them, before any deadline
    if not plain:
        for name, coro in inspect.getmembers(type(fs), inspect.iscoroutinefunction):
            twin = getattr(fs, name[1:], None) if name.startswith("_") else None
            wrapped = getattr(twin, "__wrapped__", None)
            if wrapped is not None and getattr(wrapped, "__func__", wrapped) is coro:
                plain[name[1:]] = twin
    for name, twin in plain.items():
        fs.__dict__[name] = functools.partial(twin, timeout=seconds)


def _protocol(fs: fsspec.AbstractFileSystem) -> str:
    p = fs.protocol
    return (p if isinstance(p, str) else p[0]).lower()


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _remote(method: F) -> F:
    """Turn a remote filesystem's failures (credentials, missing bucket, network) into one StoreError line."""

    @functools.wraps(method)
    def wrapper(self: "StoreLocation", *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except StoreError:
            raise
        except Exception as e:  # noqa: BLE001 - translated below, or re-raised as it is
            err = self.explain(e)
            if err is None:
                raise
            raise err from None

    return wrapper  # type: ignore[return-value]


@dataclass
class StoreLocation:
    """A store root: an fsspec filesystem plus the root path inside it (and, for reads, an optional local cache)."""

    url: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)  # may hold credentials

    def __post_init__(self) -> None:
        self.url = str(self.url).rstrip("/")
        self.storage_options = dict(self.storage_options or {})
        self.fs_options = effective_options(self.url, self.storage_options)
        self.cache_dir: str | None = None
        self._cache_storage: str | None = None
        self._connect()

    def _connect(self) -> None:
        """(Re)create the filesystem objects: once, and again in a forked or unpickled process (DataLoader
        workers), because async filesystems such as s3fs must not be shared across a fork."""
        options = dict(self.fs_options)
        self._deadline = float(options.pop("call_timeout", CALL_TIMEOUT))
        try:
            self._fs, self.root = url_to_fs(self.url, **options)
        except Exception as e:  # noqa: BLE001 - any filesystem's own refusal (zip:// of a file that is no zip, ...)
            raise StoreError(f"cannot open {self.url}: {_one_line(e)}; check the URL and --storage-options") from None
        if _protocol(self._fs) in ("s3", "s3a"):
            self._fs.retries = S3_RETRIES
        with_deadline(self._fs, self._deadline)
        self._pid = os.getpid()
        self._cache = None
        if self._cache_storage is not None:
            from fsspec.implementations.cached import SimpleCacheFileSystem

            self._cache = SimpleCacheFileSystem(fs=self._fs, cache_storage=self._cache_storage)

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        if self._pid != os.getpid():
            self._connect()
        return self._fs

    @property
    def _cache_fs(self) -> fsspec.AbstractFileSystem | None:
        if self._pid != os.getpid():
            self._connect()
        return self._cache

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fs", "_cache")} | {"_pid": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fs = self._cache = None

    # ---------------------------------------------------------------------------------------------- description
    @property
    def protocol(self) -> str:
        return _protocol(self.fs)

    @property
    def is_local(self) -> bool:
        return "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    @property
    def endpoint(self) -> str:
        """Where a remote filesystem sends its requests, for error messages."""
        so = self.fs_options
        ep = so.get("endpoint_url") or (so.get("client_kwargs") or {}).get("endpoint_url")
        ep = ep or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return ep or f"the default {self.protocol} endpoint"

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def zarr_url(self, rel: str) -> str:
        """URL of a sub-path for zarr.open_group(..., storage_options=...)."""
        return self.path(rel) if self.is_local else f"{self.url}/{rel}"

    def explain(self, e: BaseException) -> StoreError | None:
        """One line for a remote failure the user can fix; None for anything else (kept as it is)."""
        if self.is_local:
            return None
        text = _one_line(e)
        if isinstance(e, TypeError) and "unexpected keyword argument" in text:  # s3fs passes unknown keys on
            return StoreError(f"--storage-options for {self.url}: {text.rpartition(' ')[2]} is not an option of "
                              f"the {self.protocol} filesystem; check its name")
        if isinstance(e, NotImplementedError):  # http(s):// reads but cannot list, write, rename or delete
            return StoreError(f"the {self.protocol} filesystem cannot do what {self.url} needs here (it is "
                              "read-only or cannot list); use a local path or an object store URL (s3://, gs://)")
        if isinstance(e, PermissionError):
            return StoreError(
                f"access denied to {self.url} at {self.endpoint} ({text}); check the credentials: --storage-options "
                "'{\"key\": ..., \"secret\": ...}', AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile"
            )
        if isinstance(e, FileNotFoundError) and ("bucket does not exist" in text.lower() or "NoSuchBucket" in text):
            return StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it or fix the URL")
        if isinstance(e, _connection_error_types()):
            if type(e).__name__ == "NoCredentialsError":
                return StoreError(f"no credentials for {self.url}; pass --storage-options '{{\"key\": ..., "
                                  "\"secret\": ...}}' or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
            if type(e).__name__ == "FSTimeoutError":
                text = f"no answer within the {self._deadline:g} s call_timeout"
            return StoreError(
                f"cannot reach {self.endpoint} for {self.url} ({text}); check the endpoint URL and the network, then "
                "rerun the same command to resume (timeouts and retries: call_timeout and config_kwargs in "
                "--storage-options)"
            )
        return None

    @_remote
    def check_bucket(self) -> None:
        """Refuse a remote URL whose bucket is missing, with one request (and its bounded retries)."""
        if self.is_local or self.protocol not in ("s3", "s3a", "gs", "gcs"):
            return
        try:
            self.fs.info(self.bucket)
        except FileNotFoundError:
            raise StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}; create it or fix the URL") from None

    # --------------------------------------------------------------------------------------------------- reading
    @_remote
    def exists(self, rel: str = "") -> bool:
        return self.fs.exists(self.path(rel))

    @_remote
    def isdir(self, rel: str = "") -> bool:
        return self.fs.isdir(self.path(rel))

    @_remote
    def read_bytes(self, rel: str, expect: dict[str, Any] | None = None, limit: int | None = None) -> bytes:
        """The file's bytes; with `expect` ({"bytes": ...} from a manifest) through the read cache when one is set.

        A local file must be a regular file of at most `limit` bytes (or the size `expect` records): a FIFO, a
        device or a file longer than that is refused before it is read; a remote one is checked against `limit`
        once downloaded (parsing is what takes memory: see MAX_JSON_BYTES)."""
        if self.is_local:
            if expect is not None:
                return self._local(rel, lambda path: read_regular(path, int(expect["bytes"]), "the manifest records"))
            if limit is not None:
                return self._local(rel, lambda path: read_regular(path, limit, "a manifest may have"))
            return self._local(rel, _read_all)
        if expect is not None and self._cache_fs is not None:
            with self.open(rel, expect=expect) as f:
                return f.read()
        raw = self.fs.cat_file(self.path(rel))
        if limit is not None and len(raw) > limit:  # checked once downloaded: a listing would cost a request
            raise StoreError(f"{self.path(rel)} has {len(raw):,} bytes, more than the {show_bytes(limit)} a manifest "
                             "may have; the store is damaged or was not written by fdpipe")
        return raw

    def _local(self, rel: str, read: Callable[[str], Any]) -> Any:
        """read(path) of a local store file; a file that is not regular or too long is one StoreError line."""
        path = self.path(rel)
        try:
            return read(path)
        except RefusedFileError as e:
            raise StoreError(f"{path} {e}; the store is damaged or was not written by fdpipe") from None

    def check_regular(self, rels: Sequence[str]) -> None:
        """Refuse, in one line, a local store file among `rels` that is not a regular file: zarr and tensorstore
        would open a FIFO there and wait forever. Remote stores hold objects only."""
        if self.is_local:
            for rel in rels:
                self._local(rel, check_regular)

    def read_json(self, rel: str, limit: int = MAX_JSON_BYTES) -> Any:
        """A manifest, draft or marker: at most `limit` bytes, nested no deeper than json can parse."""
        return parse_json(self.read_bytes(rel, limit=limit), self.path(rel))

    @_remote
    def open(self, rel: str, mode: str = "rb", expect: dict[str, Any] | None = None) -> BinaryIO:
        """Open a file; reads of a file whose size the manifest records (`expect`) use the read cache when set."""
        if mode == "rb" and expect is not None and self._cache_fs is not None:
            return self._open_cached(rel, int(expect["bytes"]))
        if mode == "rb" and self.is_local:
            return self._local(rel, open_regular)
        return self.fs.open(self.path(rel), mode)

    def use_cache(self, cache_dir: str | os.PathLike | None, key: str) -> None:
        """Read immutable store files through a local whole-file cache under cache_dir/key (remote stores only).

        `key` is the store fingerprint: it covers the sha256 of every file, so a cached copy under it can never be
        stale, even when another store is later written at the same URL.
        """
        if cache_dir is None or self.is_local:
            return
        storage = os.path.join(os.path.abspath(os.path.expanduser(str(cache_dir))), key)
        try:
            os.makedirs(storage, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the cache directory {storage}: {e.strerror or e}; choose a writable "
                             "--cache-dir") from None
        self.cache_dir, self._cache_storage = str(cache_dir), storage
        self._connect()

    def _open_cached(self, rel: str, nbytes: int) -> BinaryIO:
        """A local copy of a remote file, downloaded on first use; a copy of the wrong size (a download cut off
        by a crash, say) is dropped and fetched again."""
        assert self._cache_fs is not None
        for attempt in range(2):
            f = self._cache_fs.open(self.path(rel), "rb")
            size = os.fstat(f.fileno()).st_size
            if size == nbytes:
                return f
            f.close()
            try:
                os.remove(f.name)
            except OSError:
                pass
        raise StoreError(f"{self.path(rel)} has {size} bytes, the manifest says {nbytes}; the store is damaged "
                         "(run `fdpipe store verify`)")

    @_remote
    def ls(self, rel: str) -> list[str]:
        """Names (not paths) directly under `rel`, or [] when it does not exist."""
        try:
            return sorted(p.rstrip("/").rpartition("/")[2] for p in self.fs.ls(self.path(rel), detail=False))
        except FileNotFoundError as e:
            if self.explain(e) is not None:
                raise
            return []

    @_remote
    def sizes(self) -> dict[str, int]:
        """{relative path: bytes} of every file under the root, with one recursive listing."""
        prefix = self.root.rstrip("/") + "/"
        try:
            found = self.fs.find(self.root, detail=True)
        except FileNotFoundError as e:
            if self.explain(e) is not None:
                raise
            return {}
        return {p[len(prefix):]: int(d.get("size") or 0) for p, d in found.items()
                if p.startswith(prefix) and d.get("type", "file") != "directory"}

    def sha256(self, rel: str, expect_bytes: int | None = None) -> tuple[int, str]:
        """(bytes, sha256 hex) of a file as stored (never through the read cache), streamed; see `digest`."""
        entry = self.digest(rel, expect_bytes)
        return entry["bytes"], entry["sha256"]

    @_remote
    def digest(self, rel: str, expect_bytes: int | None = None) -> dict[str, Any]:
        """The manifest entry (bytes, sha256, crc32c) of a file as stored (never through the read cache), streamed.
        A local file of other than `expect_bytes` bytes is not read: its size, with empty digests."""
        if self.is_local:
            f = self._local(rel, open_regular)
            size = os.fstat(f.fileno()).st_size
            if expect_bytes is not None and size != expect_bytes:
                f.close()
                return {"bytes": size, "sha256": "", "crc32c": ""}
        else:
            f = self.fs.open(self.path(rel), "rb")
        digest = Digest()
        with f:
            while chunk := f.read(CHUNK):
                digest.update(chunk)
        return digest.entry()

    def escape(self, rel: str) -> tuple[str, str] | None:
        """(the shortest part of `rel`, where it leads) when a link takes `rel` outside a local store's root; else
        None (remote stores have no links)."""
        if not self.is_local:
            return None
        root = os.path.realpath(self.root)
        parts = [p for p in rel.split("/") if p]
        for i in range(1, len(parts) + 1):
            real = os.path.realpath(self.path("/".join(parts[:i])))
            if os.path.commonpath([root, real]) != root:
                return "/".join(parts[:i]), real
        return None

    def inside(self, rel: str, doing: str = "write") -> str:
        """The path of `rel`, refused in one line when a link takes it outside the store: nothing is written, renamed
        or deleted through a link that leaves the store (every write, commit and removal below asks here)."""
        out = self.escape(rel)
        if out is not None:
            raise StoreError(f"{self.path(out[0])} is a link that leads outside the store (to {out[1]}); refusing to "
                             f"{doing} through it: replace the link with a folder inside {self.url}")
        return self.path(rel)

    # --------------------------------------------------------------------------------------------------- writing
    def makedirs(self, rel: str) -> None:
        if self.is_local:
            self.fs.makedirs(self.inside(rel), exist_ok=True)

    @_remote
    def put_atomic(self, rel: str, data: bytes | Sequence[Any]) -> dict[str, Any]:
        """Write `data` (bytes, or the file's pieces in order) under a temporary name and move it into place;
        returns the file's manifest entry (bytes, sha256, crc32c), hashed as it is written."""
        tmp = self._tmp_name(rel)
        self.makedirs(rel.rpartition("/")[0])
        digest = Digest()

        def hashed() -> Iterator[Any]:
            for piece in [data] if isinstance(data, (bytes, bytearray, memoryview)) else data:
                digest.update(piece)
                yield piece

        try:
            if self.is_local:  # the one local file writer; the commit below is the rename
                write_pieces(self.inside(tmp), hashed())
            else:
                with self.fs.open(self.inside(tmp), "wb") as f:
                    for piece in hashed():
                        f.write(piece)
        except OSError as e:
            _name_the_file(e, self.path(rel))
            raise
        self.commit(tmp, rel)
        return digest.entry()

    def put_new(self, rel: str, data: bytes) -> bool:
        """Write `rel` only where it is absent; True when this call's bytes became the file. Locally the complete
        file is hard-linked into place, which fails when another writer got there first; on an object store the
        name is checked and then written, so two writers at once may both write it (the last wins), and callers
        read the file back rather than trust their own bytes."""
        if self.exists(rel):
            return False
        if not self.is_local:
            self.put_atomic(rel, data)
            return True
        staged = self._tmp_name(rel)
        self.put_atomic(staged, data)
        try:
            os.link(self.inside(staged), self.inside(rel))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(self.inside(staged))

    def _tmp_name(self, rel: str) -> str:
        head, _, name = rel.rpartition("/")
        tmp = f"{TMP_PREFIX}{uuid.uuid4().hex[:12]}-{name}"
        return f"{head}/{tmp}" if head else tmp

    def open_atomic(self, rel: str) -> "AtomicWriter":
        return AtomicWriter(self, rel)

    @_remote
    def commit(self, tmp: str, rel: str) -> None:
        """Move a complete temporary file to its final name (a rename locally, copy + delete on object stores)."""
        self.fs.mv(self.inside(tmp, "rename"), self.inside(rel, "rename"))

    @_remote
    def remove(self, rel: str) -> None:
        if self.fs.exists(self.path(rel)):
            self.fs.rm(self.inside(rel, "delete"), recursive=True)

    @_remote
    def remove_stale_tmp(self, under: list[str]) -> int:
        """Delete temporary files left under the given folders by crashed writers; returns how many."""
        removed, prefix = 0, self.root.rstrip("/") + "/"
        for rel in under:
            top = self.inside(rel, "delete")
            # a local store is walked by os.walk (links not followed): fsspec's find asked for every file's info,
            # 3 s of finalize for ImageNet's 20,000 files
            paths = ([f"{d}/{f}" for d, _, files in os.walk(top) for f in files] if self.is_local
                     else self.fs.find(top))
            for path in paths:
                if path.rpartition("/")[2].startswith(TMP_PREFIX):
                    self.fs.rm_file(self.inside(path[len(prefix):], "delete") if path.startswith(prefix) else path)
                    removed += 1
        return removed


class AtomicWriter:
    """A writable file that appears under its final name only on a clean close, hashing what passes through."""

    def __init__(self, loc: StoreLocation, rel: str):
        self.loc, self.rel = loc, rel
        self.tmp = loc._tmp_name(rel)
        loc.makedirs(rel.rpartition("/")[0])
        self._f = _remote(lambda loc_: loc_.fs.open(loc_.inside(self.tmp), "wb"))(loc)
        self.digest = Digest()

    def write(self, data: bytes) -> int:
        self.digest.update(data)
        try:
            return self._f.write(data)
        except OSError as e:
            _name_the_file(e, self.loc.path(self.rel))
            raise

    def flush(self) -> None:
        self._f.flush()

    def tell(self) -> int:
        return self.digest.bytes

    @property
    def entry(self) -> dict[str, Any]:
        """The file's manifest entry (bytes, sha256, crc32c) of what was written."""
        return self.digest.entry()

    def __enter__(self) -> "AtomicWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            _remote(lambda loc_: self._f.close())(self.loc)
            self.loc.commit(self.tmp, self.rel)
            return
        try:
            if self.loc.is_local:
                self._f.close()
            else:  # an object store: abort the upload instead of finishing it with partial data
                self._f.discard()
                self._f.closed = True  # so that garbage collection does not try to finish it either
        except Exception:  # noqa: BLE001 - already failing; the original error is the one to report
            pass
        try:
            self.loc.remove(self.tmp)
        except Exception:  # noqa: BLE001
            pass



def parse_json(raw: bytes, where: str) -> Any:
    """json.loads with the garbage collector paused (millions of small lists made it rescan them all, again and
    again: 45 s for 64 MB of them); bad JSON, nested too deeply too, is one StoreError naming `where`."""
    import gc

    enabled = gc.isenabled()
    gc.disable()
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise StoreError(f"{where} is not valid JSON ({why}); the file is corrupt") from None
    finally:
        if enabled:
            gc.enable()


def _read_all(path: str) -> bytes:
    with open_regular(path) as f:
        return f.read()


def _name_the_file(e: OSError, path: str) -> None:
    """A full disk's error often names no file; the one-line message should say which one was being written."""
    if e.errno == errno.ENOSPC and not e.filename:
        e.filename = path


def crc32c_extend(crc: int, piece: Any) -> int:
    """`crc` extended by the bytes of `piece` (bytes, or any buffer: google-crc32c takes read-only bytes or arrays,
    so a bytearray or memoryview is wrapped as one without a copy)."""
    import google_crc32c

    return google_crc32c.extend(crc, piece if isinstance(piece, bytes) else np.frombuffer(piece, np.uint8))


class Digest:
    """A file's bytes, sha256 (what `verify` and resume check) and crc32c (what a reader checks as it streams: 5x
    cheaper than sha256, so replay can afford it on every read), updated piece by piece without copies."""

    def __init__(self) -> None:
        self._sha, self.crc, self.bytes = hashlib.sha256(), 0, 0

    def update(self, piece: Any) -> None:
        self._sha.update(piece)
        self.crc = crc32c_extend(self.crc, piece)
        self.bytes += memoryview(piece).nbytes

    def entry(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "crc32c": f"{self.crc:08x}", "sha256": self._sha.hexdigest()}
