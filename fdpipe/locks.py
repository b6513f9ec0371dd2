"""Advisory locks on folders, so that two processes never write one run folder or one local store at once.

The lock is `flock` on the folder itself: no lock file is left behind, and the kernel drops it when the process ends,
however it ends (a crash never leaves a stale lock). It lasts while the returned object lives. Within one process a
second request for a folder it already holds returns the same lock (a library caller retrying after an error is not
locked out by itself). Ranks of one job share a lock (`shared=True`), which still keeps out a single-process writer.
Where flock does not exist (Windows), the filesystem does not support it, or the folder cannot be made, nothing is
locked (the caller's own writes then fail in their own words).
"""

from __future__ import annotations

import errno
import os
import weakref

from .errors import FdpipeError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class FolderLock:
    """A held lock; released when the object is garbage-collected or `release` is called, or at exit."""

    def __init__(self, path: str, fd: int | None):
        self.path, self._fd, self._pid = path, fd, os.getpid()

    def release(self) -> None:
        # only the process that took it closes its descriptor; a forked DataLoader worker's copy is its own
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __del__(self) -> None:
        self.release()


_HELD: "weakref.WeakValueDictionary[str, FolderLock]" = weakref.WeakValueDictionary()


def lock_folder(path: str | os.PathLike, busy: str, shared: bool = False) -> FolderLock:
    """Lock the folder `path` (created when missing) for this process; FdpipeError `busy` when another holds it."""
    real = os.path.realpath(os.fspath(path))
    held = _HELD.get(real)
    if held is not None and held._pid == os.getpid():
        return held
    fd = None
    if fcntl is not None:
        try:
            os.makedirs(real, exist_ok=True)
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
        except OSError:  # not a folder, or not writable: the caller's first write says so in its own words
            return FolderLock(real, None)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                fd = None  # e.g. ENOLCK or EOPNOTSUPP on a network filesystem: unlocked, as before
            else:
                raise FdpipeError(busy) from None
    lock = FolderLock(real, fd)
    _HELD[real] = lock
    return lock
