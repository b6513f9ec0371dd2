"""Shard commits in background threads behind a bounded queue, so that the teacher waits only when the queue is full.

A commit encodes, hashes and writes one finished shard (files first, then its `_progress` marker), so a commit
that never ran, or stopped half-way, leaves a shard that a rerun computes again. The first failure stops the
workers; the teacher loop sees it at its next step (`check`, `submit`) and raises one line naming the shard.
"""

from __future__ import annotations

import errno
import threading
import time
from collections import deque
from typing import Callable

from ..errors import FdpipeError, StoreError

# what to do about an OSError, by errno; anything else: "fix that"
_HINTS = {errno.ENOSPC: "free space", errno.EDQUOT: "free space", errno.EACCES: "make --out writable",
          errno.EPERM: "make --out writable", errno.EROFS: "make --out writable"}


def failure(shard: int, e: BaseException) -> BaseException:
    """The error to raise for a failed commit: one line for a cause the user can fix, else the exception itself."""
    if isinstance(e, FdpipeError):  # already one line, e.g. a remote store's refusal (StoreLocation.explain)
        return StoreError(f"shard {shard}: could not commit: {e}; then rerun to resume")
    if isinstance(e, OSError):
        cause = f"{e.strerror or e}: {e.filename}" if e.filename else str(e.strerror or e)
        return StoreError(f"shard {shard}: could not commit ({cause}); "
                          f"{_HINTS.get(e.errno, 'fix that')} and rerun to resume")
    return e  # a bug: keep its traceback


class Committer:
    """A few worker threads that run shard commits; at most `queue_size` shards wait for a free worker.

    Use it as a context manager: on leaving with an exception, queued commits are dropped and running ones
    finish before the exception goes on.
    """

    def __init__(self, workers: int, queue_size: int, name: str = "commit"):
        self.queue_size = queue_size
        self.blocked_s = 0.0  # time submit() waited for a free queue slot
        self.drain_s = 0.0  # time finish() waited for the last commits
        self._cv = threading.Condition()
        self._pending: deque[tuple[int, Callable[[], None]]] = deque()
        self._closed = False
        self._error: tuple[int, BaseException] | None = None
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    def submit(self, shard: int, commit: Callable[[], None]) -> None:
        """Queue one shard's commit; waits while the queue is full; raises the first failure instead."""
        with self._cv:
            if len(self._pending) >= self.queue_size and self._error is None:
                t0 = time.perf_counter()
                self._cv.wait_for(lambda: len(self._pending) < self.queue_size or self._error is not None)
                self.blocked_s += time.perf_counter() - t0
            self._raise_failure()
            self._pending.append((shard, commit))
            self._cv.notify_all()

    def check(self) -> None:
        """Raise the first failed commit's error, if any (the teacher loop calls this every step)."""
        with self._cv:
            self._raise_failure()

    def finish(self) -> None:
        """Wait until every queued commit has run; raises the first failure."""
        t0 = time.perf_counter()
        self._stop(drop_pending=False)
        self.drain_s = time.perf_counter() - t0
        self.check()

    def __enter__(self) -> "Committer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop(drop_pending=True)  # after finish() the workers are gone: nothing left to do

    # --------------------------------------------------------------------------------------------------- inside
    def _raise_failure(self) -> None:
        if self._error is not None:
            shard, e = self._error
            err = failure(shard, e)
            if err is e:
                raise e
            raise err from None

    def _stop(self, drop_pending: bool) -> None:
        with self._cv:
            self._closed = True
            if drop_pending:
                self._pending.clear()
            self._cv.notify_all()
        for t in self._threads:
            t.join()

    def _work(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._pending or self._closed or self._error is not None)
                if self._error is not None or not self._pending:
                    return  # a commit failed, or closed with nothing left to do
                shard, commit = self._pending.popleft()
                self._cv.notify_all()  # a queue slot is free
            try:
                commit()
            except BaseException as e:  # noqa: BLE001 - handed to the teacher loop, which raises it
                with self._cv:
                    if self._error is None:
                        self._error = (shard, e)
                        self._pending.clear()  # stop: the queued shards are left for the rerun
                    self._cv.notify_all()
                return
            del commit  # its shard's host buffers go now, not when the next commit comes
