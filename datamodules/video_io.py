"""Video decoding with PyAV (torchcodec does not run with CPU torch); writing is `finetune.media.write_video`."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np


def count_frames(path: Path) -> tuple[int, int, int]:
    """(frames, height, width) of the first video stream, read from the header when it says."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = stream.frames
        height, width = stream.codec_context.height, stream.codec_context.width
        if frames <= 0:  # some containers do not store the count: decode to count
            frames = sum(1 for _ in container.decode(stream))
    return frames, height, width


def read_frames(path: Path, indices: list[int]) -> np.ndarray:
    """The frames at `indices` (sorted), as uint8 [F, H, W, 3]."""
    wanted = set(indices)
    last = max(indices)
    picked = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                picked[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    if len(picked) != len(wanted):
        raise ValueError(f"{path}: could decode only {len(picked)} of the {len(wanted)} frames needed")
    return np.stack([picked[i] for i in indices])
