"""Local files: reading what somebody else may have made (only regular files, never more than a stated size), and
writing files whole (a temporary file, then a rename).

A FIFO where a file is expected blocks its reader forever, a link to /dev/zero never ends, and a directory raises
IsADirectoryError deep in a library; a file far larger than it should be (a 300 MB manifest) takes gigabytes to
parse. These helpers refuse each before reading a byte, so that every caller can say in one line which file is
wrong. Opening uses O_NONBLOCK (a FIFO opens at once instead of waiting for a writer) and checks the opened file
itself, so nothing can swap the file between the check and the read.

Every file fdpipe writes appears whole or not at all: it is written under a temporary name beside its final one and
renamed over it (`replacing`, `write_atomic`), so a crash or a full disk leaves the old file as it was.
"""

from __future__ import annotations

import contextlib
import os
import stat
from typing import Any, BinaryIO, Iterable, Iterator

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class RefusedFileError(Exception):
    """A file not read: str() says why, to follow its name (`x is a FIFO, not a regular file`); `path` is the file."""

    def __init__(self, why: str, path: str):
        super().__init__(why)
        self.path = path


class NotRegularFileError(RefusedFileError):
    """The path names a directory, FIFO, device or socket."""


class FileTooLargeError(RefusedFileError):
    """The file holds more bytes than its reader accepts."""


def _kind(mode: int) -> str | None:
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def _refuse(path: str, mode: int) -> None:
    kind = _kind(mode)
    if kind is not None:
        raise NotRegularFileError(f"is {kind}, not a regular file", path)


def check_regular(path: str | os.PathLike) -> None:
    """NotRegularFileError when `path` (followed through links) is not a regular file, for files that another library
    opens (zarr, tensorstore); a path that does not exist is left to that library."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    _refuse(os.fspath(path), mode)


def open_regular(path: str | os.PathLike) -> BinaryIO:
    """`path` opened for binary reading; NotRegularFileError (naming what it is) when it is not a regular file."""
    path = os.fspath(path)
    _refuse(path, os.stat(path).st_mode)  # a device is not even opened (opening some has effects)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        _refuse(path, os.fstat(fd).st_mode)  # the file opened, whatever the path names now
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike, limit: int, bound: str = "a file may have") -> bytes:
    """The bytes of a regular file of at most `limit` bytes (`bound` says whose limit, for the message); the size is
    checked before anything is read, and no more than `limit` + 1 bytes are ever read (the file may grow meanwhile)."""
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
        if size > limit or len(data) > limit:
            raise FileTooLargeError(f"has {max(size, len(data)):,} bytes, more than the {show_bytes(limit)} {bound}",
                                    os.fspath(path))
        return data


def show_bytes(n: int) -> str:
    """1 MiB, 64 MiB, 5,222 bytes."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n:,} bytes"


# ------------------------------------------------------------------------------------------------------ writing


def write_pieces(path: str | os.PathLike, pieces: Iterable[Any], fsync: bool = False) -> None:
    """Write the byte-like `pieces` in order into a new file at `path` (a temporary name: see `replacing`); with
    `fsync` the bytes are on the disk before this returns, so that a rename after it never shows an empty file."""
    with open(path, "wb") as f:
        for piece in pieces:
            f.write(piece)
        if fsync:
            f.flush()
            os.fsync(f.fileno())


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """A temporary path beside `path` for the block to write; a clean exit os.replace()s it onto `path`.

    On any error the temporary file is removed and the old file stays as it was; an OSError of the write (a full
    disk's names no file) names `path`, not the temporary file."""
    path = os.fspath(path)
    head, name = os.path.split(path)
    tmp = os.path.join(head, f".{name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and (e.filename is None or e.filename == tmp):
            e.filename = path
        raise


def write_atomic(path: str | os.PathLike, data: Any) -> None:
    """`data` (bytes) as the whole of `path`, on the disk (fsync) before it takes the name."""
    with replacing(path) as tmp:
        write_pieces(tmp, [data], fsync=True)
