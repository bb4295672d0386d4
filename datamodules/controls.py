"""Control images for control recipes (CogView4 control): where each sample's control comes from (`data.control`).

- `pairs`: a control image per image, from a `control_image` column (`metadata.jsonl`/csv, or a dataset column:
  `data.control_column`), or else a `controls/` folder beside the images holding a file of the same name;
- `canny`: computed on the fly from the image, after it is resized and cropped to its bucket (so edges are one pixel
  wide at the training size, as a canny map made for a 1024^2 generation is), with OpenCV's `cv2.Canny`
  (`data.canny_low`, `data.canny_high`: the hysteresis thresholds);
- `depth_from_file`: a depth map per image in a `depth/` folder (same file name), e.g. written by a depth estimator
  beforehand; 8- or 16-bit greyscale, scaled to its own 0..255 range and repeated on three channels.

A control image given as a file must be the size of its image (a mismatched pair is named before the model loads);
it is resized and cropped with its image, into the same bucket.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from datamodules.textfiles import DataError, decode_utf8_lines

CONTROLS = ("pairs", "canny", "depth_from_file")
FOLDERS = {"pairs": "controls", "depth_from_file": "depth"}


def check_mode(control: str | None) -> None:
    if control is not None and control not in CONTROLS:
        raise DataError(f"data.control={control!r}: use one of {list(CONTROLS)} (or null without a control).")


def metadata_column(root: Path, column: str) -> list | None:
    """The `column` value of every entry of `root/metadata.jsonl` or `metadata.csv`, in the order `read_metadata`
    returns them (None where an entry has none); None when no entry has the column."""
    import csv
    import json

    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        entries = [json.loads(line) for line in decode_utf8_lines(jsonl) if line.strip()]
    else:
        entries = list(csv.DictReader(decode_utf8_lines(table)))
    values = [entry.get(column) or None if isinstance(entry, dict) else None for entry in entries]
    return values if any(v is not None for v in values) else None


def control_files(root: Path, images: list[str], control: str, column: str) -> list[str | None]:
    """Each image's control file for `pairs` (the metadata's `column`, relative to `root`, else `controls/<name>`)
    or `depth_from_file` (`depth/<name>`); None for a computed control."""
    if control not in FOLDERS:
        return [None] * len(images)
    named = metadata_column(root, column) if control == "pairs" else None
    files = []
    for i, image in enumerate(images):
        if named is not None and named[i] is not None:
            files.append(str(root / named[i]))
        else:
            files.append(str(root / FOLDERS[control] / Path(image).relative_to(root)))
    return files


def depth_to_rgb(image: Image.Image) -> Image.Image:
    """A depth map (8/16-bit or float greyscale, or RGB) scaled to its own 0..255 range, on three channels."""
    array = np.asarray(image, dtype=np.float64)
    if array.ndim == 3:
        array = array[..., :3].mean(axis=2)
    low, high = float(array.min()), float(array.max())
    scaled = np.zeros_like(array) if high <= low else (array - low) / (high - low) * 255.0
    return Image.fromarray(np.repeat(scaled.round().astype(np.uint8)[..., None], 3, axis=2))


def canny(pixels: torch.Tensor, low: int = 100, high: int = 200) -> torch.Tensor:
    """OpenCV's Canny edges of an image [3, H, W] in [-1, 1], as a white-on-black image [3, H, W] in [-1, 1]."""
    import cv2

    rgb = ((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)
    return torch.from_numpy(edges.astype(np.float32) / 127.5 - 1.0)[None].expand(3, -1, -1).clone()


def check_pair(image_size: tuple[int, int], control_size: tuple[int, int], image: str, control: str) -> None:
    if tuple(image_size) != tuple(control_size):
        raise DataError(f"{control}: the control image is {control_size[0]}x{control_size[1]} (HxW) but its image "
                        f"{image} is {image_size[0]}x{image_size[1]}; a control must be the size of its image (make "
                        f"it from the image at that size, or resize it) or remove the pair.")
