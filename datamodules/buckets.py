"""Aspect-ratio buckets and a resumable batch sampler that never mixes them.

A text-to-image model generates a range of sizes (its family gives the limits as a `finetune.data.ImageSpec`;
CogView4: sides multiples of 32 in 512..2048, at most 2^21 pixels); training at the images' own aspect ratios
(instead of squashing or cropping all to a square) keeps compositions intact. Buckets have about `target_pixels` pixels each (one per height, plus its
transpose), an image goes to the bucket nearest its aspect ratio, and a batch holds one bucket only, since
its latents must stack and share one noise shift (which depends on the image size).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Iterator

import torch
from torch.utils.data import Sampler

from datamodules.sampling import ResumableEpochs
from datamodules.textfiles import DataError


def make_buckets(target_pixels: int, min_side: int, max_side: int, multiple: int,
                 max_pixels: int) -> list[tuple[int, int]]:
    """(height, width) pairs: for each allowed height the widest width with `h * w <= target_pixels`,
    within [min_side, max_side]; sides are multiples of `multiple`. Sorted by aspect ratio (h / w)."""
    if min_side % multiple or max_side % multiple or min_side > max_side:
        raise DataError(f"model.min_side={min_side} and model.max_side={max_side} must be multiples of "
                        f"model.bucket_multiple={multiple} with min_side <= max_side.")
    if not min_side * min_side <= target_pixels <= max_pixels:
        raise DataError(f"model.bucket_pixels={target_pixels} must lie between min_side^2={min_side * min_side} and "
                        f"model.max_pixels={max_pixels}.")
    buckets = set()
    for h in range(min_side, max_side + 1, multiple):
        w = min(max_side, target_pixels // h // multiple * multiple)
        if w >= min_side:
            buckets.update({(h, w), (w, h)})
    return sorted(buckets, key=lambda hw: (hw[0] / hw[1], hw[0]))


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket with the closest aspect ratio (in log space, so 2:1 and 1:2 are equally far from 1:1);
    ties go to the larger bucket."""
    aspect = math.log(height / width)
    return min(buckets, key=lambda hw: (abs(math.log(hw[0] / hw[1]) - aspect), -hw[0] * hw[1]))


class BucketBatchSampler(ResumableEpochs, Sampler[list[int]]):
    """Batches of indices from one bucket each, shuffled per epoch, sharded across ranks, resumable.

    Every epoch (seeded by `seed + epoch`): indices are shuffled within their bucket, cut into batches of
    `batch_size` (a bucket's last, smaller batch is kept unless `drop_last`), and the batches are shuffled.
    With several processes each rank takes every `world_size`-th batch; the list is first padded by
    repeating batches so that all ranks run the same number of steps. Rank and world size are read from
    `torch.distributed` when it is initialised (set `trainer.use_distributed_sampler: false`, the sampler
    shards itself).

    `state_dict()` records the epoch and the batches already handed out; torchdata's `StatefulDataLoader`
    saves it in checkpoints, so a resumed run continues mid-epoch with the same next batch. The epoch follows
    Lightning's `set_epoch` and moves on after a pass that handed the whole epoch out
    (`datamodules.sampling.ResumableEpochs`).
    """

    def __init__(self, buckets: list, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None):
        if batch_size < 1:
            raise DataError(f"data.batch_size={batch_size} must be at least 1.")
        self.buckets = [tuple(b) for b in buckets]
        self.batch_size, self.seed, self.shuffle, self.drop_last = batch_size, seed, shuffle, drop_last
        self._num_replicas, self._rank = num_replicas, rank
        self.epoch, self.yielded = 0, 0

    @property
    def sampler(self) -> BucketBatchSampler:
        """Lightning calls `set_epoch` on `loader.batch_sampler.sampler`, never on the batch sampler: this one."""
        return self

    def _world(self) -> tuple[int, int]:
        replicas, rank = self._num_replicas, self._rank
        if replicas is None or rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            replicas = replicas if replicas is not None else (dist.get_world_size() if on else 1)
            rank = rank if rank is not None else (dist.get_rank() if on else 0)
        return replicas, rank

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """All ranks' batches of `epoch`, in order (the same on every rank)."""
        generator = torch.Generator().manual_seed(self.seed + epoch)
        by_bucket: dict[tuple, list[int]] = defaultdict(list)
        for index, bucket in enumerate(self.buckets):
            by_bucket[bucket].append(index)
        batches = []
        for bucket in sorted(by_bucket):
            indices = by_bucket[bucket]
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start: start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        replicas, _ = self._world()
        if batches and len(batches) % replicas:
            batches += batches[: replicas - len(batches) % replicas]
        return batches

    def rank_batches(self, epoch: int) -> list[list[int]]:
        """This rank's batches of `epoch`, in order."""
        replicas, rank = self._world()
        return self.epoch_batches(epoch)[rank::replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return self._pass(self.rank_batches)

    def __len__(self) -> int:
        return len(self.rank_batches(self.epoch))
