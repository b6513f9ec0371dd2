"""Parquet and CSV file lists: a `path` column, optional `label` and `key`, in the list's order."""

from __future__ import annotations

import posixpath

import fsspec

from fdpipe.errors import FdpipeError

from .decode import one_line, sanitize_key, split_ext, unique_keys
from fdpipe.files import NotRegularFileError, open_regular

from .source import ImageSource, apply_limit, encode_labels, is_local, local_or_url, read_bytes


class ListSource(ImageSource):
    """A parquet or CSV list: column `path` (relative to the list's folder, absolute, or a URL), optional `label`
    and `key`. Rows keep the list's order; keys default to the path without its extension."""

    def __init__(self, spec: str, fs: fsspec.AbstractFileSystem, list_path: str, limit: int | None = None,
                 storage_options: dict | None = None):  # fmt: skip
        self.spec, self.limit, self._storage_options = spec, limit, dict(storage_options or {})
        table = _read_table(fs, list_path, spec)
        twice = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
        if twice:
            raise FdpipeError(f"{spec} has the column {twice[0]!r} {table.column_names.count(twice[0])} times; "
                              "keep one")
        if "path" not in table.column_names:
            raise FdpipeError(
                f"{spec} has no 'path' column (columns: {', '.join(table.column_names) or 'none'}); "
                "add a 'path' column with the image paths"
            )
        paths = [p for p in table.column("path").to_pylist()]
        if not paths:
            raise FdpipeError(f"no images at {spec}: the list has no rows; add rows with a 'path' column")
        bad = [i for i, p in enumerate(paths) if not isinstance(p, str) or not p.strip()]
        if bad:
            raise FdpipeError(f"{spec} row {bad[0]} has an empty 'path'; fill it in or drop the row")
        bad = [i for i, p in enumerate(paths) if "\x00" in p]
        if bad:  # no file system names a file so: os.stat raises ValueError
            raise FdpipeError(f"{spec} row {bad[0]}: the path holds a NUL byte, which no file name can; fix the row")
        raw_labels = table.column("label").to_pylist() if "label" in table.column_names else [None] * len(paths)
        self.labels, self.classes = encode_labels(raw_labels, lambda i: f"{spec} row {i}")
        base_dir = posixpath.dirname(list_path)
        self._urls = [self._resolve(fs, base_dir, p.strip()) for p in paths]
        if "key" in table.column_names:  # keys as given, made safe: no dots, no leading '/', no empty parts
            given = ["" if k is None else str(k) for k in table.column("key").to_pylist()]
            entries = [(sanitize_key(k), "", f"{spec} row {i}") for i, k in enumerate(given)]
        else:
            first: dict[str, int] = {}
            for i, url in enumerate(self._urls):
                if first.setdefault(url, i) != i:
                    raise FdpipeError(f"{spec} lists {paths[i].strip()!r} twice (rows {first[url]} and {i}); "
                                      "list each image once, or give each row its own 'key'")
            entries = [(sanitize_key(stem), ext, p) for p in paths for stem, ext in [_key_stem(p)]]
        self.keys = unique_keys(entries)
        apply_limit(limit, self.keys, self.labels, self._urls)

    @staticmethod
    def _resolve(fs: fsspec.AbstractFileSystem, base_dir: str, path: str) -> str:
        if "://" in path or path.startswith("/"):
            return path
        return local_or_url(fs, posixpath.normpath(posixpath.join(base_dir, path)))

    def _read(self, i: int) -> bytes:
        url = self._urls[i]
        fs, path = fsspec.core.url_to_fs(url, **self._storage_options)
        return read_bytes(fs, path, url)

    def location(self, i: int) -> str:
        return self._urls[i]


def _key_stem(path: str) -> tuple[str, str]:
    """Key part of a listed path: relative paths as written (normalised), absolute ones without the leading '/'
    and URLs without their scheme."""
    path = path.strip().replace("\\", "/")
    if "://" in path:
        path = path.split("://", 1)[1]
    path = posixpath.normpath(path).lstrip("/")
    stem, ext = split_ext(path)
    return stem, ext


def _read_table(fs: fsspec.AbstractFileSystem, path: str, spec: str):
    import pyarrow.csv as pacsv
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with open_regular(path) if is_local(fs) else fs.open(path, "rb") as f:  # a FIFO would block forever
            if path.lower().endswith(".parquet"):
                return pq.read_table(pa.BufferReader(f.read()))  # see fdpipe.store.index.decode
            return pacsv.read_csv(pa.BufferReader(f.read()))
    except FileNotFoundError as e:
        raise FdpipeError(f"no images at {spec}: the list file does not exist; check the path") from e
    except NotRegularFileError as e:
        raise FdpipeError(f"the file list {spec} {e}; point at a CSV or parquet file") from None
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid & co for malformed files
        raise FdpipeError(f"cannot read the file list {spec}: {one_line(e)}; fix or regenerate it") from e
