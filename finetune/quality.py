"""Quality signals of a validation sample, measured on its pixels (docs/tracking.md#quality-signals): motion,
mean saturation, colour drift from the untrained model's sample of the same prompt and seed, and for image-to-video
the first frame's distance from the conditioning image. Pure functions of numpy frames (T x H x W x 3 for a video,
H x W x 3 for an image; uint8 in 0..255 or floats in 0..1); every value is on the 0..1 intensity scale.

No optical flow: no flow library (OpenCV) is installed with the kit, so motion is the mean absolute frame-to-frame
difference, which is zero for a still clip and grows with how much of the frame moves and how far."""

from __future__ import annotations

from typing import Any

import numpy as np

HISTOGRAM_BINS = 32


def frames_of(data: Any) -> np.ndarray:
    """A sample's pixels as float32 T x H x W x 3 in 0..1: a video's frames (array or list of frames), or an image
    (PIL or H x W x 3 array) as one frame."""
    if hasattr(data, "convert"):  # a PIL image
        data = np.asarray(data.convert("RGB"))
    array = np.asarray(data)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"expected T x H x W x 3 or H x W x 3 RGB pixels, got shape {array.shape}")
    if np.issubdtype(array.dtype, np.integer):
        return array.astype(np.float32) / 255.0
    return np.clip(array.astype(np.float32), 0.0, 1.0)


def motion(data: Any) -> float:
    """Mean absolute difference between consecutive frames (all pixels and channels): 0 for a still clip or an
    image."""
    frames = frames_of(data)
    if len(frames) < 2:
        return 0.0
    return float(np.abs(np.diff(frames, axis=0)).mean())


def saturation(data: Any) -> float:
    """Mean HSV saturation, (max - min) / max over the RGB channels of each pixel (0 for black and greys)."""
    frames = frames_of(data)
    high, low = frames.max(axis=-1), frames.min(axis=-1)
    return float(np.where(high > 0, (high - low) / np.maximum(high, 1e-12), 0.0).mean())


def color_histogram(data: Any, bins: int = HISTOGRAM_BINS) -> np.ndarray:
    """Per-channel histograms of all frames, `bins` equal bins over 0..1, each normalised to sum 1: 3 x bins."""
    frames = frames_of(data)
    index = np.minimum((frames * bins).astype(np.int64), bins - 1).reshape(-1, 3)
    counts = np.stack([np.bincount(index[:, c], minlength=bins) for c in range(3)]).astype(np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def color_drift(data: Any, baseline: Any, bins: int = HISTOGRAM_BINS) -> float:
    """Total variation distance between the colour histograms (half the L1 distance, averaged over R, G and B):
    the share of pixel mass that sits in other intensity bins than in `baseline`; 0 for the same colours, 1 for
    disjoint ones. Independent of where things are in the frame, so moving content does not count as drift."""
    return float(0.5 * np.abs(color_histogram(data, bins) - color_histogram(baseline, bins)).sum(axis=1).mean())


def first_frame_distance(data: Any, condition: Any) -> float:
    """Mean absolute difference between the first frame and the conditioning image resized to the frame's size
    (bilinear): 0 for a clip that starts with the condition image."""
    from PIL import Image

    first = frames_of(data)[0]
    height, width = first.shape[:2]
    image = condition if hasattr(condition, "convert") else Image.fromarray(_uint8(frames_of(condition)[0]))
    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return float(np.abs(first - frames_of(image)[0]).mean())


def _uint8(frame: np.ndarray) -> np.ndarray:
    return (np.clip(frame, 0.0, 1.0) * 255).round().astype(np.uint8)


def sample_signals(kind: str, data: Any, condition: Any = None, baseline: Any = None) -> dict[str, float]:
    """The signals of one sample (a `finetune.family.Sample`'s kind, data and condition): saturation for every
    picture, motion for a video, `first_frame_distance` with a condition image, `color_drift` with the baseline
    sample's data. Text samples have none."""
    if kind not in ("video", "image"):
        return {}
    signals = {"saturation": saturation(data)}
    if kind == "video":
        signals["motion"] = motion(data)
        if condition is not None:
            signals["first_frame_distance"] = first_frame_distance(data, condition)
    if baseline is not None:
        signals["color_drift"] = color_drift(data, baseline)
    return signals


def quality_warnings(signals: dict[str, float], baseline: dict[str, float], min_motion_ratio: float,
                     max_color_drift: float, label: str = "sample") -> list[str]:
    """What looks wrong in one sample's `signals` against its baseline's: motion collapse (motion below
    `min_motion_ratio` x the baseline's, when the baseline moves at all) and colour drift above `max_color_drift`.
    docs/tracking.md#quality-signals says why these defaults."""
    found = []
    moved, still = baseline.get("motion"), signals.get("motion")
    if moved is not None and still is not None and moved > 0 and still < min_motion_ratio * moved:
        found.append(f"{label}: motion collapse: motion {still:.4f} is below {min_motion_ratio:g} x the untrained "
                     f"model's {moved:.4f} (the clip stops moving; lower optimizer.lr or use an earlier export; "
                     f"docs/tracking.md#quality-signals)")
    drift = signals.get("color_drift")
    if drift is not None and drift > max_color_drift:
        found.append(f"{label}: colour drift {drift:.3f} from the untrained model's sample exceeds {max_color_drift:g} "
                     f"(over-saturated or burnt colours; lower optimizer.lr or use an earlier export; "
                     f"docs/tracking.md#quality-signals)")
    return found
