"""Replaying a plan's views: the data order (pure functions), the replay sources and the student's transform.

distill, finetune and analyze all read stores through this layer (`open_replay`, `online_replay`: a `Replay`); it
never imports a stage.
"""

from .datasets import EpochSampler, LiveViews, StoredViews, StreamedViews, TargetReader, samples_per_epoch
from .epochs import (VIEW_SOURCES, OnlineReplay, Replay, WdsReplay, ZarrReplay, online_replay, open_replay,
                     pixel_source, store_source)
from .order import (buffer_shuffle, epoch_permutation, epoch_rng, epoch_samples, epoch_views, shard_order,
                    shard_views)
from .transform import student_transform

__all__ = ["Replay", "ZarrReplay", "WdsReplay", "OnlineReplay", "online_replay", "open_replay", "store_source",
           "pixel_source", "VIEW_SOURCES",
           "TargetReader", "EpochSampler", "StoredViews", "StreamedViews", "LiveViews", "samples_per_epoch",
           "student_transform", "buffer_shuffle", "epoch_permutation", "epoch_rng", "epoch_samples", "epoch_views",
           "shard_order", "shard_views"]
