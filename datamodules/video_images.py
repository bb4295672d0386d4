"""Images in video training: an image is a one-frame sample, in a (1, H, W) bucket of its own.

A row of the video data (`data.root`, or `data.image_root`) whose file is an image (by its extension:
`IMAGE_EXTENSIONS`) is a one-frame sample: it is decoded whole (EXIF rotation applied), goes to the largest (1, H, W)
bucket it fills without upscaling, one per (height, width) of the model's buckets (`one_frame_buckets`), and is
resized and cropped as a clip's frames are. Its buckets differ from every clip's in frame count, so a batch never
mixes images and clips (`datamodules.video_buckets.VideoBatchSampler`). Whether the model takes them is the family's
(`finetune.data.VideoSpec.one_frame`): text-to-video CogVideoX does, image-to-video refuses them, before the model
loads (`refuse_images`). What the model does with one frame is the family's (docs/cogvideox.md).

The encoded-cache key of an image names the file (path, size, mtime), its (1, H, W) bucket, its caption and
`IMAGE_PREPROCESSING`, which differs from the clips' `PREPROCESSING`: an image and a clip never share a key.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from datamodules.textfiles import DataError
from datamodules.video_buckets import Bucket, pick_bucket
from datamodules.video_io import describe, read_image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# How an image becomes a one-frame sample, part of its key (so of the encoded cache's keys): change it with the code.
IMAGE_PREPROCESSING = "image=one-frame;exif=transpose;resize=bilinear-antialias-cover;crop=centre;range=-1..1"


def is_image_file(source) -> bool:
    """A file path (not embedded bytes) whose extension is an image's."""
    return isinstance(source, (str, Path)) and Path(source).suffix.lower() in IMAGE_EXTENSIONS


def one_frame_buckets(buckets: list[Bucket]) -> list[Bucket]:
    """(1, H, W) for each (height, width) of the model's buckets, in their order."""
    return list(dict.fromkeys((1, int(h), int(w)) for _, h, w in buckets))


def refuse_images(images: list[str], family_takes_them: bool, conditioning_image: bool) -> None:
    """One clear line, before the model loads, when the family takes no one-frame samples."""
    if not images or family_takes_them:
        return
    why = ("an image-to-video sample is the motion that follows its first frame, and a one-frame sample has none"
           if conditioning_image else "this model family trains on clips only")
    raise DataError(f"{len(images)} of the samples are images (one-frame samples), e.g. {images[0]}, but {why}. "
                    f"Train them with a text-to-video recipe (docs/data.md#images-in-video-data), or remove them from "
                    f"data.root / set data.image_root=null.")


def probe_image(path: str, prompt: str, origin: str, buckets: list[Bucket], checked) -> dict:
    """An image checked as the run will read it (decoded whole; an unchanged one once across checks): its record,
    or DataError naming what is wrong and the fix."""
    if Path(path).stat().st_size == 0:
        raise DataError(f"{path}: is empty (0 bytes): the data is missing (its copy or download did not finish, or it "
                        f"is a placeholder). Copy it again, or remove the entry and its caption.")
    known = checked.get(origin) or {}
    if known.get("image") and "height" in known:
        height, width = known["height"], known["width"]
    else:
        try:
            height, width = read_image(path).shape[:2]
        except Exception as err:
            raise DataError(f"{describe(path)}: image cannot be decoded ({type(err).__name__}: {err}). Re-save it "
                            f"(PNG/JPEG/WebP) or remove it.") from None
        checked.put(origin, {"image": True, "height": height, "width": width})
    bucket = pick_bucket(1, height, width, buckets)
    if bucket is None:
        _, h, w = min(buckets, key=lambda b: b[1] * b[2])
        raise DataError(f"{path}: is {height}x{width} (height x width) and fits none of the one-frame buckets without "
                        f"upscaling; the smallest is {h}x{w}. Use a larger image, remove it, or train the model at a "
                        f"smaller size.")
    key = [origin, "x".join(map(str, bucket)), hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32],
           "prep=" + hashlib.sha256(IMAGE_PREPROCESSING.encode("utf-8")).hexdigest()[:12]]
    return {"video": path, "video_row": -1, "image": None, "image_row": -1, "frames": 1, "bucket": bucket,
            "prompt": prompt, "key": "|".join(key), "kind": "image"}
