"""Video and image decoding for the video data (PyAV: torchcodec does not run with CPU torch); writing is
`finetune.media.write_video`.

A source is a file path, or what `datasets.Video(decode=False)` / `datasets.Image(decode=False)` give: a dict
with the file's `bytes` (embedded in parquet/Arrow) or its `path`.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterator

import av
import numpy as np

Source = str | Path | dict


def describe(source: Source) -> str:
    """How messages name a source: its path, or `embedded video bytes`."""
    if isinstance(source, dict):
        return str(source.get("path") or "embedded bytes")
    return str(source)


def _open(source: Source):
    if isinstance(source, dict):
        return av.open(io.BytesIO(source["bytes"])) if source.get("bytes") else av.open(str(source["path"]))
    return av.open(str(source))


class UndecodableCodec(ValueError):
    """The container opens, but the installed PyAV/FFmpeg has no decoder for its video stream's codec."""

    def __init__(self, codec: str | None):
        self.codec = codec or "unknown"
        named = f"`{codec}` (the file's codec tag)" if codec else "(one FFmpeg does not name)"
        super().__init__(f"its video codec {named} has no decoder in the installed PyAV {av.__version__} / FFmpeg")


def _video_stream(container, source: Source):
    if not container.streams.video:
        raise ValueError(f"{describe(source)} has no video stream")
    stream = container.streams.video[0]
    if stream.codec_context is None:  # PyAV makes no codec context for a codec FFmpeg cannot decode
        raise UndecodableCodec(codec_tag(source))
    return stream


def codec_tag(source: Source) -> str | None:
    """The four-character code of an MP4/MOV file's first sample entry (`avc1`, `hvc1`, `ap4h`, ...), read from its
    `stsd` box: FFmpeg gives no name for a codec it has no decoder for. None for other containers."""
    import mmap

    def tag(data) -> str | None:
        at = data.find(b"stsd")
        code = bytes(data[at + 16: at + 20]) if at >= 0 else b""
        return code.decode("ascii") if len(code) == 4 and all(32 < c < 127 for c in code) else None

    try:
        if isinstance(source, dict) and source.get("bytes"):
            return tag(source["bytes"])
        path = source.get("path") if isinstance(source, dict) else source
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return tag(data)
    except (OSError, ValueError, TypeError):
        return None


def count_frames(source: Source) -> tuple[int, int, int]:
    """(frames, height, width) of the first video stream; the frame count from the header when it has one
    (a header can promise more frames than the file holds: `check_frames` finds out)."""
    with _open(source) as container:
        stream = _video_stream(container, source)
        frames = stream.frames
        height, width = stream.codec_context.height, stream.codec_context.width
        if frames <= 0:  # some containers do not store the count: decode to count
            frames = sum(1 for _ in container.decode(stream))
    return frames, height, width


def _decode(source: Source, last: int) -> Iterator[tuple[int, av.VideoFrame]]:
    """(index, frame) for frames 0..last, in order; stops early at the end of the stream."""
    with _open(source) as container:
        stream = _video_stream(container, source)
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            yield i, frame
            if i >= last:
                break


def check_frames(source: Source, indices: list[int]) -> None:
    """Decode the clip up to the last of `indices` (the frames a run samples), without converting them to RGB:
    a file cut short or corrupt before that frame raises ValueError saying how far decoding got."""
    last, decoded = max(indices), 0
    try:
        for i, _ in _decode(source, last):
            decoded = i + 1
    except av.FFmpegError as err:
        raise ValueError(f"decoding failed after {decoded} frames ({type(err).__name__}: {err})") from None
    if decoded <= last:
        raise ValueError(f"only {decoded} frames decode")


def read_frames(source: Source, indices: list[int]) -> np.ndarray:
    """The frames at `indices` (sorted), as uint8 [F, H, W, 3]."""
    wanted = set(indices)
    picked = {i: frame.to_ndarray(format="rgb24") for i, frame in _decode(source, max(indices)) if i in wanted}
    if len(picked) != len(wanted):
        raise ValueError(f"{describe(source)}: could decode only {len(picked)} of the {len(wanted)} frames needed")
    return np.stack([picked[i] for i in indices])


def read_image(source: Source) -> np.ndarray:
    """A whole image, EXIF rotation applied, as uint8 [H, W, 3] (fully decoded: a truncated body raises)."""
    from PIL import Image, ImageOps

    if isinstance(source, dict):
        opened = Image.open(io.BytesIO(source["bytes"])) if source.get("bytes") else Image.open(source["path"])
    else:
        opened = Image.open(source)
    with opened as image:
        return np.array(ImageOps.exif_transpose(image).convert("RGB"), dtype=np.uint8)
