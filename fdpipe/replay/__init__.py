"""Replaying a plan's views: the data order (pure functions), the replay datasets and the student's transform.

distill, finetune and analyze all read stores through this layer; it never imports a stage.
"""

from .datasets import EpochSampler, OnlineReplay, StoreReplay, WdsReplay, samples_per_epoch
from .epochs import Replay, online_replay, open_replay, store_source
from .order import (buffer_shuffle, epoch_permutation, epoch_rng, epoch_samples, epoch_views, shard_order,
                    shard_views)
from .transform import student_transform

__all__ = ["Replay", "online_replay", "open_replay", "store_source", "EpochSampler", "OnlineReplay", "StoreReplay", "WdsReplay", "samples_per_epoch", "student_transform",
           "buffer_shuffle", "epoch_permutation", "epoch_rng", "epoch_samples", "epoch_views", "shard_order",
           "shard_views"]
