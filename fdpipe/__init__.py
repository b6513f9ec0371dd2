"""fdpipe: feature distillation with a cached, shareable teacher-feature store.

The library API, for a training loop of your own (see the README, "Use a store in your own training loop"):

- `open_store(url)`: a store, local or fsspec;
- `open_replay(store, transform, seed=, rank=, world=)`: its views for a student, epoch by epoch, with the order, resume
  position and DDP split of `fdpipe distill` (`.loader(epoch, start, batch_size)`, or `.epoch(epoch)` for a Dataset);
- `student_transform(model, image_size)`: the student's view transform from its timm data config;
- `Distiller(student, channels, grid, prefix)`: a student plus its 1x1 projection head, shaped like the targets
  (the mapping of one teacher: see `fdpipe.models.distiller`);
- `fd_loss(pred, target)`: smooth-L1 with beta 2, FD's loss;
- `matching_image_size(grid, patch)`, `create_student(name, image_size=)`, `open_source(spec)`.

Several teachers: `open_replay([store1, store2], transform)` replays their shared plan once and `replay.targets(batch)`
is {teacher: targets} (names from `teacher_names`; the stores must agree, `check_stores_agree`);
`Distiller(student, {teacher: TeacherInfo or (channels, grid, prefix)})` has a head per teacher and returns
{teacher: pred}; `weighted_fd_loss(pred, target, weights)` is the weighted sum of their FD losses, with each one.

Names load on first use, so `import fdpipe` (and `fdpipe --help`) stays instant.
"""

import importlib
import os
from typing import Any

# DataLoader workers share the cores with the main process. Spinning OpenMP threads then wait for descheduled peers:
# on 2 cores a student step measured 10-30x slower than with sleeping waits, which cost little when a core is free.
# Set before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Large CPU tensors (a batch of views, a shard's targets) are fresh allocations each time, and their first touch costs
# a page fault per 4 KiB: an extraction step measured a third of its CPU time in them. torch backs tensors of 2 MiB
# or more with huge pages when THP_MEM_ALLOC_ENABLE is set before its first allocation (Linux; no effect elsewhere);
# the values are the same. An explicit setting in the environment wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"

_API = {
    "open_store": "fdpipe.store",
    "open_replay": "fdpipe.replay",
    "Replay": "fdpipe.replay",
    "student_transform": "fdpipe.replay",
    "Distiller": "fdpipe.models",
    "fd_loss": "fdpipe.models",
    "matching_image_size": "fdpipe.models",
    "create_student": "fdpipe.models",
    "open_source": "fdpipe.data",
    "teacher_names": "fdpipe.replay.epochs",
    "check_stores_agree": "fdpipe.replay.epochs",
    "weighted_fd_loss": "fdpipe.models.distiller",
}
__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'fdpipe' has no attribute {name!r}")
