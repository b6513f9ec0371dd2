"""The tar files of wds stores: written in one piece to a temporary name, read front to back with every byte
crc32c-checked against the manifest before any sample is handed on."""

from __future__ import annotations

import functools
import tarfile
from typing import Any, Iterator

from ...errors import StoreError
from ..fs import StoreLocation, crc32c_extend


def write_tar(loc: StoreLocation, rel: str, samples: list[dict[str, bytes | str]],
              spans: list[tuple[int, int, int]] | None = None) -> dict[str, Any]:
    """Stream one tar to a temporary name and move it into place; returns its manifest entry. `spans`, when given,
    receives each sample's (offset, bytes, crc32c) in the tar: its headers, members and padding, in one piece."""
    with loc.open_atomic(rel) as f:
        out = SpanCrc(f)
        with _tar_writer()(out, encoder=False, mtime=0) as tw:  # an int: no PAX header (1 KiB) per member
            if all(ustar_name(f"{s['__key__']}.{k}") for s in samples for k in s if k != "__key__"):
                tw.tarstream.format = tarfile.USTAR_FORMAT  # the same bytes, without the PAX checks' cost
            for sample in samples:
                start = out.start_span()
                tw.write(sample)
                if spans is not None:
                    spans.append((start, out.pos - start, out.crc))
    return f.entry


class SpanCrc:
    """A writable file passing bytes on to `f`, with the crc32c of what it passed since `start_span`: tarfile
    writes each member's header, data and padding before `write` returns, so a sample's bytes are one span."""

    def __init__(self, f: Any):
        self.f, self.pos, self.crc = f, 0, 0

    def start_span(self) -> int:
        self.crc = 0
        return self.pos

    def write(self, b: Any) -> int:
        self.crc = crc32c_extend(self.crc, b)
        self.pos += memoryview(b).nbytes
        return self.f.write(b)

    def tell(self) -> int:
        return self.pos

    def flush(self) -> None:
        self.f.flush()


def ustar_name(name: str) -> bool:
    """A member name that a PAX tar writes as a plain ustar header: ASCII, at most 100 bytes. For such members
    tarfile's USTAR and PAX formats give the same bytes (tests/store/test_io.py), and USTAR skips the per-member checks
    for PAX records (a sixth of a wds shard's write time at CLIP-L shape)."""
    return name.isascii() and len(name) <= tarfile.LENGTH_NAME


@functools.cache
def _tar_writer() -> type:
    """webdataset's TarWriter over a plain (not streamed) tarfile copying members in one piece. The bytes are the
    same, but tarfile's stream mode re-slices its buffer for every 10 KiB block it emits, and its 16 KiB copies
    are a write call each: together they cost more than hashing a 0.5 MiB member."""
    import webdataset as wds

    class TarWriter(wds.TarWriter):
        tarmode = staticmethod(lambda fileobj, compress=None: "w")

        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.tarstream.copybufsize = 16 << 20

    return TarWriter


def _safe_member(name: str) -> bool:
    return not (name.startswith("/") or ".." in name.split("/"))


def iter_tar(loc: StoreLocation, rel: str, expect: dict[str, Any] | None = None,
             skip: frozenset[int] = frozenset()) -> Iterator[dict[str, Any]]:
    """Samples of one tar as dicts of member bytes (bytearrays, so arrays made on them are writable), grouped by
    webdataset's `group_by_keys`.

    tarfile parses the headers, and each member's data is one read into its own buffer (webdataset's streamed
    reader copies it in 10 KiB pieces: half the replay's time at CLIP-L shape). Anything but a regular file with
    a relative name (a link, a device, `../x`) is refused. `expect` is the file's manifest entry: with it, a remote
    tar is read through the location's read cache, and when it has a crc32c (format 3) every byte is checked
    against it as the tar streams, and no sample is handed on before the whole file matched. The samples at the
    positions in `skip` (0 = the tar's first sample) are not decoded: only read for that checksum.
    """
    from webdataset.tariterators import base_plus_ext, group_by_keys

    crc = None if expect is None else expect.get("crc32c")
    with loc.open(rel, expect=expect) as raw:
        f = Crc32cReader(raw)

        def members():
            sample, key = -1, None
            with tarfile.open(fileobj=f, mode="r:") as tar:
                for info in tar:
                    tar.members = []  # a shard's member list is not kept: memory stays flat
                    prefix = base_plus_ext(info.name)[0]
                    if prefix != key:
                        sample, key = sample + 1, prefix
                    if not _safe_member(info.name):
                        raise StoreError(f"{loc.path(rel)}: unsafe tar member name {info.name!r}; refusing to read")
                    if not info.isreg():
                        raise StoreError(f"{loc.path(rel)}: member {info.name!r} is not a regular file (a link or "
                                         "device); fdpipe stores hold files only: refusing to read")
                    if sample in skip:
                        continue
                    data = bytearray(info.size)
                    f.seek(info.offset_data)
                    if f.readinto(data) != info.size:
                        raise tarfile.ReadError(f"member {info.name!r} is truncated")
                    yield {"fname": info.name, "data": data, "__url__": rel}
            f.read_to_end()

        try:
            samples = group_by_keys(members())
            if crc is None:  # format 1 and 2: nothing to check against while streaming
                yield from samples
                return
            held = list(samples)
        except tarfile.TarError as e:
            raise StoreError(f"{loc.path(rel)}: corrupt tar ({e}); run `fdpipe store verify`") from None
        except ValueError as e:  # group_by_keys: a sample's member twice (one sample written twice in a row)
            raise StoreError(f"{loc.path(rel)}: {' '.join(str(e.args[0]).split())}; the store is damaged (run "
                             "`fdpipe store verify --deep`)") from None
        except Exception as e:  # noqa: BLE001 - a remote read failing mid-stream: one line when the user can fix it
            err = loc.explain(e)
            if err is None:
                raise
            raise err from None
    if f"{f.crc:08x}" != crc:
        raise StoreError(f"{loc.path(rel)}: its bytes do not match the manifest's crc32c (the file is corrupt); "
                         "nothing of it was used: run `fdpipe store verify` and replace the store")
    yield from held


class Crc32cReader:
    """A read-only file that crc32c-hashes every byte it passes on, in order; forward seeks read (and hash) the
    gap, so that tar padding and skipped members are covered too."""

    def __init__(self, f: Any):
        self.f, self.pos, self.crc = f, 0, 0

    def _hash(self, b: Any) -> None:
        self.crc = crc32c_extend(self.crc, b)
        self.pos += len(b)

    def read(self, n: int = -1) -> bytes:
        b = self.f.read(n)
        self._hash(b)
        return b

    def readinto(self, b: bytearray) -> int:
        n = self.f.readinto(b)
        self._hash(memoryview(b)[:n])
        return n

    def seek(self, pos: int, whence: int = 0) -> int:
        target = pos if whence == 0 else self.pos + pos if whence == 1 else None
        if target is None or target < self.pos:
            raise tarfile.ReadError("the tar reader seeks backwards; a store's tar is read front to back")
        while self.pos < target and self.read(min(target - self.pos, 1 << 22)):
            pass
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read_to_end(self) -> None:
        while self.read(1 << 22):
            pass
