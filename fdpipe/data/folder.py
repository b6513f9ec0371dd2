"""ImageFolder-style directories: images found recursively, classes from top-level subfolders."""

from __future__ import annotations

import posixpath

import fsspec

from fdpipe.errors import FdpipeError

from .decode import split_ext, unique_keys, sanitize_key
from .source import ImageSource, apply_limit, local_or_url, read_bytes

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


class FolderSource(ImageSource):
    """An ImageFolder-style directory: sorted relative paths, labels from top-level class subfolders."""

    def __init__(self, spec: str, fs: fsspec.AbstractFileSystem, root: str, limit: int | None = None):
        self.spec, self._fs, self._root, self.limit = spec, fs, root.rstrip("/") or "/", limit
        rels = sorted(find_images(fs, self._root))
        if not rels:
            raise FdpipeError(
                f"no images at {spec}: the folder holds no {'/'.join(IMAGE_EXTENSIONS)} files; "
                "point at a folder of images"
            )
        labelled = all("/" in rel for rel in rels)
        if labelled:
            self.classes = sorted({rel.split("/", 1)[0] for rel in rels})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[rel.split("/", 1)[0]] for rel in rels]
        else:
            self.classes = None
            self.labels = [None] * len(rels)
        entries = [(sanitize_key(stem), ext, rel) for stem, ext, rel in ((*split_ext(r), r) for r in rels)]
        self.keys = unique_keys(entries)
        self._rels = rels
        apply_limit(limit, self.keys, self.labels, self._rels)

    def _path(self, i: int) -> str:
        return posixpath.join(self._root, self._rels[i])

    def _read(self, i: int) -> bytes:
        return read_bytes(self._fs, self._path(i), self.location(i))

    def location(self, i: int) -> str:
        return local_or_url(self._fs, self._path(i))


def find_images(fs: fsspec.AbstractFileSystem, root: str) -> list[str]:
    """Relative '/'-separated paths of the image files under root, skipping hidden files and folders, and what is
    not a regular file (a FIFO named x.png blocks its reader forever; a device, a socket)."""
    rels = []
    prefix = root.rstrip("/") + "/"
    for path, info in fs.find(root, detail=True).items():
        if info.get("type", "file") != "file":
            continue
        rel = path[len(prefix):] if path.startswith(prefix) else posixpath.relpath(path, root)
        if any(part.startswith(".") for part in rel.split("/")):
            continue
        if split_ext(rel)[1].lower() in IMAGE_EXTENSIONS:
            rels.append(rel)
    return rels
