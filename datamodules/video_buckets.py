"""Frame-and-resolution buckets for video: which (frames, height, width) a clip trains at, and batches of one
bucket each.

The family lists the sizes its model accepts (`finetune.data.VideoSpec.buckets`, each already checked against
its frame and size rules). A clip goes to the largest bucket it can fill without upscaling, and a batch holds
one bucket only, since its latents must stack.
"""

from __future__ import annotations

import math

import torch

from datamodules.buckets import BucketBatchSampler
from datamodules.sampling import ResumableShuffle
from datamodules.textfiles import DataError

Bucket = tuple[int, int, int]  # (frames, height, width)


def bucket_volume(bucket: Bucket) -> int:
    frames, height, width = bucket
    return frames * height * width


def pick_bucket(frames: int, height: int, width: int, buckets: list[Bucket]) -> Bucket | None:
    """The largest bucket a clip of `frames` frames of `height` x `width` fills without upscaling, or None.

    Fills without upscaling: the bucket's frames <= the clip's (frames are sampled, never repeated), and its
    height <= the clip's height and its width <= the clip's width (the clip is scaled to cover the bucket,
    keeping its aspect ratio, then centre-cropped: the scale is <= 1 exactly then).
    Largest: the most pixels over all frames, frames * height * width. Ties go to the bucket whose aspect
    ratio is nearest the clip's (least cropped; in log space, so 2:1 and 1:2 are equally far from 1:1), then
    to more frames, then to the one listed first.
    """
    aspect = math.log(height / width)

    def rank(indexed):
        index, (f, h, w) = indexed
        return bucket_volume((f, h, w)), -round(abs(math.log(h / w) - aspect), 9), f, -index

    fitting = [(i, b) for i, b in enumerate(buckets) if b[0] <= frames and b[1] <= height and b[2] <= width]
    return tuple(max(fitting, key=rank)[1]) if fitting else None


def check_image_ratio(is_image: list[bool], image_ratio: float | None) -> None:
    """`data.image_ratio` against the data: a share strictly between 0 and 1, of data holding images and clips."""
    if image_ratio is None:
        return
    if not 0 < image_ratio < 1:
        raise DataError(f"data.image_ratio={image_ratio} must lie strictly between 0 and 1 (the share of the steps "
                        f"that train on images), or be null (every sample once per epoch).")
    if not any(is_image) or all(is_image):
        raise DataError(f"data.image_ratio={image_ratio} sets the share of images among clips, but the data has "
                        f"{'only images' if any(is_image) else 'no images'}. Add them (data.image_root) or set "
                        f"data.image_ratio=null.")


class VideoBatchSampler(BucketBatchSampler):
    """`BucketBatchSampler` (one bucket per batch, shuffled per epoch, whole batches sharded across ranks with
    equal step counts, resumable mid-epoch), except that when every clip is in one bucket the order is
    `ResumableShuffle`'s cut into batches: the order the video data had before buckets, so single-size runs
    (and their golden losses) keep their batches.

    `image_ratio` (with `is_image`, one flag per sample): the share of an epoch's batches that are one-frame
    (image) batches. An epoch then holds every clip batch once and `round(clips * r / (1 - r))` image batches (at
    least one), drawn from the images' own shuffled batches, cycling (a fresh shuffle per cycle) when more are
    wanted than there are, so each image is seen about equally often; then all are shuffled together. None: every
    sample once per epoch, as it comes."""

    def __init__(self, buckets: list, batch_size: int, seed: int = 0, shuffle: bool = True, drop_last: bool = False,
                 num_replicas: int | None = None, rank: int | None = None, is_image: list[bool] | None = None,
                 image_ratio: float | None = None):
        super().__init__(buckets, batch_size, seed=seed, shuffle=shuffle, drop_last=drop_last,
                         num_replicas=num_replicas, rank=rank)
        self.is_image = list(is_image) if is_image is not None else [False] * len(self.buckets)
        self.image_ratio = image_ratio
        check_image_ratio(self.is_image, image_ratio)

    def _kind_batches(self, image: bool, epoch: int) -> list[list[int]]:
        """The batches of one kind's samples in `epoch`, as `BucketBatchSampler` cuts them (indices of the whole data)."""
        indices = [i for i, flag in enumerate(self.is_image) if flag == image]
        part = BucketBatchSampler([self.buckets[i] for i in indices], self.batch_size, seed=self.seed + 7919 * image,
                                  shuffle=self.shuffle, drop_last=self.drop_last, num_replicas=1, rank=0)
        return [[indices[i] for i in batch] for batch in part.epoch_batches(epoch)]

    def _ratio_batches(self, epoch: int) -> list[list[int]]:
        clips = self._kind_batches(False, epoch)
        wanted = max(1, round(len(clips) * self.image_ratio / (1 - self.image_ratio)))
        images, cycle = [], 0
        while len(images) < wanted:
            batches = self._kind_batches(True, epoch * 1_000_003 + cycle)
            if not batches:
                break
            images += batches[: wanted - len(images)]
            cycle += 1
        batches = clips + images
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        replicas, _ = self._world()
        if batches and len(batches) % replicas:  # every rank runs the same number of steps
            batches += batches[: replicas - len(batches) % replicas]
        return batches

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self.image_ratio is not None:
            return self._ratio_batches(epoch)
        if len(set(self.buckets)) != 1:
            return super().epoch_batches(epoch)
        order = ResumableShuffle(len(self.buckets), seed=self.seed, shuffle=self.shuffle).order(epoch)
        batches = [order[start: start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        replicas, _ = self._world()
        if batches and len(batches) % replicas:  # every rank runs the same number of steps
            batches += batches[: replicas - len(batches) % replicas]
        return batches
