"""WebDataset image shards with random access: tar headers scanned once, member bytes read by offset."""

from __future__ import annotations

import re
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator

import fsspec

from fdpipe.errors import FdpipeError

from .decode import ImageReadError, Sample, one_line, sanitize_key, unique_keys
from .source import ImageSource, apply_limit, encode_labels

WDS_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # preference order when a sample holds several
_WDS_SKIP_META = re.compile(r"__[^/]*__($|/)")  # the members webdataset itself skips


@dataclass(frozen=True)
class _Member:
    shard: int
    name: str
    offset: int
    size: int


class WdsSource(ImageSource):
    """WebDataset image shards with random access: tar headers are scanned once at open, member bytes are read by
    (offset, size) on demand. Holds no open file handles, so it pickles into DataLoader workers as is; each read
    opens what it needs in the current process (a range request for remote shards)."""

    def __init__(self, spec: str, urls: list[str], limit: int | None = None, storage_options: dict | None = None):
        self.spec, self.limit, self._storage_options = spec, limit, dict(storage_options or {})
        self._urls = urls
        members: list[_Member] = []
        raw_keys: list[str] = []
        raw_cls: list[bytes | None] = []
        if limit is not None:  # stop scanning once we have enough images
            for si in range(len(urls)):
                m, k, c = self._scan(si)
                members += m
                raw_keys += k
                raw_cls += c
                if len(members) >= limit:
                    break
        else:
            with ThreadPoolExecutor(max_workers=min(16, len(urls))) as pool:
                for m, k, c in pool.map(self._scan, range(len(urls))):
                    members += m
                    raw_keys += k
                    raw_cls += c
        if not members:
            raise FdpipeError(
                f"no images at {spec}: the shards hold no samples with a {'/'.join(WDS_IMAGE_EXTENSIONS)} member; "
                "check the pattern"
            )
        self._members = members
        labels_raw = [None if c is None else c.decode("utf-8", "replace").strip() for c in raw_cls]
        self.labels, self.classes = encode_labels(labels_raw, lambda i: f"{urls[members[i].shard]}#{raw_keys[i]}")
        entries = [(sanitize_key(k), "", f"{urls[m.shard]}#{k}") for k, m in zip(raw_keys, members)]
        self.keys = unique_keys(entries)
        apply_limit(limit, self.keys, self.labels, self._members)

    def _fs(self, url: str) -> tuple[fsspec.AbstractFileSystem, str]:
        return fsspec.core.url_to_fs(url, **self._storage_options)

    def _scan(self, shard: int) -> tuple[list[_Member], list[str], list[bytes | None]]:
        """One pass over a shard's tar headers; groups members into samples the way webdataset does."""
        from webdataset.tariterators import base_plus_ext  # here: webdataset imports torch

        url = self._urls[shard]
        fs, path = self._fs(url)
        samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
        try:
            with fs.open(path, "rb") as f:
                head = f.read(2)
                f.seek(0)
                if head == b"\x1f\x8b":
                    raise FdpipeError(
                        f"shard {url} is gzip-compressed, which has no random access; store shards as plain .tar"
                    )
                with tarfile.open(fileobj=f, mode="r:") as tar:
                    for info in tar:
                        tar.members = []  # headers only; do not keep every TarInfo of a big shard
                        if not info.isreg():
                            continue
                        name = info.name
                        if name.startswith("/") or ".." in name.split("/"):
                            raise FdpipeError(
                                f"shard {url} has an unsafe member name {name!r}; rebuild the shard"
                            )
                        if "/" not in name and name.startswith("__") and name.endswith("__"):
                            continue
                        if _WDS_SKIP_META.match(name):
                            continue
                        prefix, suffix = base_plus_ext(name)
                        if prefix is None:
                            continue
                        if not samples or samples[-1][0] != prefix:
                            samples.append((prefix, {}))
                        samples[-1][1][suffix.lower()] = info
                    result = ([], [], [])
                    for prefix, parts in samples:
                        image = next((parts[e] for e in WDS_IMAGE_EXTENSIONS if e in parts), None)
                        if image is None:
                            continue
                        result[0].append(_Member(shard, image.name, image.offset_data, image.size))
                        result[1].append(prefix)
                        cls = parts.get("cls")
                        if cls is not None:
                            f.seek(cls.offset_data)
                            result[2].append(f.read(cls.size))
                        else:
                            result[2].append(None)
                    skipped = len(samples) - len(result[0])
                    if skipped:
                        warnings.warn(f"{url}: {skipped} samples have no image member and are not part of the source")
                    return result
        except FdpipeError:
            raise
        except FileNotFoundError as e:
            raise FdpipeError(f"no images at {url}: the shard does not exist; check the shard pattern") from e
        except (tarfile.TarError, OSError, EOFError) as e:
            raise FdpipeError(f"cannot read shard {url}: {one_line(e)}; the tar is corrupt, rebuild it") from e

    def _read(self, i: int) -> bytes:
        m = self._members[i]
        url = self._urls[m.shard]
        fs, path = self._fs(url)
        try:
            data = fs.cat_file(path, start=m.offset, end=m.offset + m.size)
        except FileNotFoundError as e:
            raise ImageReadError(f"no image at {url}#{m.name}: the shard is gone; restore it") from e
        except OSError as e:
            raise ImageReadError(f"cannot read {url}#{m.name}: {one_line(e)}") from e
        if len(data) != m.size:
            raise ImageReadError(f"{url}#{m.name} is shorter than its tar header says; the shard changed, reopen it")
        return data

    def __iter__(self) -> Iterator[Sample]:
        """Sequential reads through one handle per shard (cheaper than one range request per image)."""
        i, n = 0, len(self)
        while i < n:
            shard = self._members[i].shard
            url = self._urls[shard]
            fs, path = self._fs(url)
            with fs.open(path, "rb") as f:
                while i < n and self._members[i].shard == shard:
                    m = self._members[i]
                    f.seek(m.offset)
                    yield Sample(self.keys[i], f.read(m.size), self.labels[i])
                    i += 1

    def location(self, i: int) -> str:
        m = self._members[i]
        return f"{self._urls[m.shard]}#{m.name}"
