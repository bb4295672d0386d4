"""Frame-and-resolution buckets for video: which (frames, height, width) a clip trains at, and batches of one
bucket each.

The family lists the sizes its model accepts (`finetune.data.VideoSpec.buckets`, each already checked against
its frame and size rules). A clip goes to the largest bucket it can fill without upscaling, and a batch holds
one bucket only, since its latents must stack.
"""

from __future__ import annotations

import math

from datamodules.buckets import BucketBatchSampler
from datamodules.sampling import ResumableShuffle

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


class VideoBatchSampler(BucketBatchSampler):
    """`BucketBatchSampler` (one bucket per batch, shuffled per epoch, whole batches sharded across ranks with
    equal step counts, resumable mid-epoch), except that when every clip is in one bucket the order is
    `ResumableShuffle`'s cut into batches: the order the video data had before buckets, so single-size runs
    (and their golden losses) keep their batches."""

    def epoch_batches(self, epoch: int) -> list[list[int]]:
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
