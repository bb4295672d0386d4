"""Video-caption data for the CogVideoX recipes, on Hugging Face `datasets`, in frame-and-resolution buckets.

Sources (`data.root`; datamodules/video_sources.py reads them): the CogVideo finetune layout (`prompts.txt`,
`videos.txt`, optional `images.txt`), a folder with `metadata.jsonl`/`metadata.csv`, a Hugging Face dataset (a
`save_to_disk` folder, parquet, or a hub name; `video_column`, `caption_column`, `image_column`), or `demo`
(generated, datamodules/demo_videos.py).

The sizes come from the model family (`finetune.data.VideoSpec`, handed over by the engine): each clip goes to
the largest (frames, height, width) bucket it fills without upscaling (datamodules/video_buckets.py), its
frames are sampled evenly from its start, each frame is scaled (aspect kept) to cover the bucket and
centre-cropped, then scaled to [-1, 1]. A batch holds one bucket only. For image-to-video
(`spec.conditioning_image`) a sample also has `image`: the file the data names for the clip, resized and
cropped the same way, else the clip's first sampled frame. Samples: `video` [F, 3, H, W], `prompt`, `key`
(the encoded-cache key: the file, caption, bucket, conditioning image and preprocessing), and `image` [3, H, W].
Images (`image_root`, or image files among `root`'s rows) are one-frame samples in (1, H, W) buckets of their own
where the family takes them (`spec.one_frame`; datamodules/video_images.py), `image_ratio` their share of the steps.
Once the engine has encoded every sample (`finetune.cache`), it serves the cached encodings in place of the training
dataset, read by key: no video is decoded during training.

`check()` runs before the model loads and decodes, for every clip, the frames the run will use (in a thread
pool, with a progress bar for many clips): an empty (0-byte) file, a truncated or corrupt one, a codec the installed
FFmpeg cannot decode, a missing file or conditioning image, an empty caption or a clip that fits no bucket is
collected (datamodules/sample_checks.py), and the run stops with all of them listed, each with the fix for its
kind (`on_bad_sample=fail`), or leaves each out with a warning (`on_bad_sample=skip`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.caption_options import check_dropout, child_module, parse_roots, repeated, with_trigger
from datamodules.layouts import split_folder
from datamodules.textfiles import DataError
from datamodules.video_buckets import VideoBatchSampler, bucket_volume, check_image_ratio, pick_bucket
from datamodules.sample_checks import BadSamples, CheckedFiles, check_all
from datamodules.video_images import is_image_file, one_frame_buckets, probe_image, refuse_images
from datamodules.video_io import UndecodableCodec, check_frames, count_frames, describe, read_frames, read_image
from datamodules.table import TableDataset
from datamodules.video_sources import (ClipRow, EmbeddedFile, has_list_layout, has_metadata, read_dataset,
                                       read_list_layout, read_metadata_layout)
from finetune.data import FamilyDataModule, VideoSpec
from finetune.hub import cache_root

PROGRESS_FROM = 32  # clips: fewer are checked without a progress bar
# How a clip becomes pixels, part of every sample key (so of the encoded cache's keys): change it with the code.
PREPROCESSING = "frames=stride-from-start;resize=bilinear-antialias-cover;crop=centre;range=-1..1;image=same"
# The fix for each kind of bad clip (docs/data.md, "Checking the data").
EMPTY_FIX = ("Copy or download it again from its source (a placeholder, e.g. a cloud-sync or Git LFS stub, must be "
             "fetched first), or remove the entry and its caption.")
CORRUPT_FIX = ("Download or copy it again; if the source itself is damaged, re-encode it, e.g. `ffmpeg -i IN -c:v "
               "libx264 -pix_fmt yuv420p OUT.mp4`, or remove it.")
CODEC_FIX = ("Convert it to H.264 with an FFmpeg that decodes that codec, e.g. `ffmpeg -i IN -c:v libx264 -pix_fmt "
             "yuv420p OUT.mp4`, or remove it.")


class BadSampleWarning(UserWarning):
    """A clip left out by `data.on_bad_sample=skip`."""


def frame_indices(available: int, wanted: int) -> list[int]:
    """`wanted` frames evenly strided from the clip's start (as the official loader: stride = n // wanted)."""
    stride = max(1, available // wanted)
    return list(range(0, stride * wanted, stride))


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, height, width] in [-1, 1]: scale the shorter side, crop centre."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    _, _, h, w = video.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    video = video[:, :, top: top + height, left: left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0)


def _caption(value, where: str) -> str:
    if isinstance(value, (list, tuple)):  # several captions per clip: take the first
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: empty or missing caption ({value!r}). Fill it in or remove the entry.")
    return value.strip()


def _origin(source) -> str:
    """A file by path, size and mtime; embedded bytes by their hash."""
    if isinstance(source, dict) and source.get("bytes"):
        return "sha256:" + hashlib.sha256(source["bytes"]).hexdigest()[:32]
    path = Path(source["path"] if isinstance(source, dict) else source)
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _load(source):
    """A row's media as video_io reads it: a path, or a dict of embedded bytes (a bare path stays a path)."""
    if isinstance(source, EmbeddedFile):
        source = source.load()
    if isinstance(source, dict) and not source.get("bytes"):
        source = source.get("path")
    return source


def _exists(source, where: str, what: str, fix: str) -> None:
    if source is None or source == {}:
        raise DataError(f"{where}: no {what} given. {fix}")
    if isinstance(source, str) and not Path(source).is_file():
        raise DataError(f"{where}: {what} {source} does not exist. {fix}")


class VideoDataModule(FamilyDataModule):
    """Args:
        root: the dataset folder (CogVideo layout or metadata.jsonl/.csv), a save_to_disk folder, parquet file(s),
            a hub dataset name, or `demo` for the generated demo set (written once to the cache).
        prompt_file, video_file: the caption and path lists of the CogVideo layout.
        image_file: image-to-video, CogVideo layout: one conditioning image per line (optional; without it
            each clip starts from its first frame).
        split, dataset_config: the split and configuration of a dataset.
        video_column: a dataset's videos (file paths, or a `datasets.Video` feature; never decoded by datasets).
        caption_column: the caption column (metadata or dataset); null takes the first of prompt, text, caption.
        image_column: image-to-video: the conditioning image column; null takes `image` where there is one.
        batch_size: per device; a batch never mixes buckets.
        num_workers: decoding processes.
        seed: the order of the batches (independent of the model's noise draws).
        drop_last: drop each bucket's last, smaller batch.
        on_bad_sample: `fail` stops after the check, listing every bad clip (the first SHOWN, and how many more)
            with its fix; `skip` leaves bad clips out with a warning each.
        check_workers: threads decoding the clips in `check()`.
        recheck_files: decode every clip in `check()` even when an earlier check found it, unchanged (same path,
            size and mtime), decodable as far as this run samples (`<kit cache>/checked/videos.jsonl`).
        demo_count: samples of the generated demo set (root=demo; image_root=demo: images of the generated demo
            image set).
        image_root: a second folder of images (metadata.jsonl/.csv or prompts.txt + videos.txt naming image files),
            or `demo`; None: none. Images (in it or in `root`, by extension) train as one-frame samples in (1, H, W)
            buckets where the family takes them (datamodules/video_images.py); a batch never mixes them with clips.
        image_ratio: the share of each epoch's steps that train on images (0 < r < 1; images repeat or are
            subsampled to reach it); None: every sample once per epoch.
    The buckets and whether samples carry a conditioning image come from the model family (`connect`).
    """

    spec_type = VideoSpec
    setting_ranges = {"batch_size": ">=1", "num_workers": ">=0", "check_workers": ">=1",
                      "demo_count": ">=1"}  # checked by finetune.settings.check

    def __init__(self, root: str | None, prompt_file: str = "prompts.txt", video_file: str = "videos.txt",
                 image_file: str = "images.txt", split: str = "train", dataset_config: str | None = None,
                 video_column: str = "video", caption_column: str | None = None, image_column: str | None = None,
                 batch_size: int = 1, num_workers: int = 0, seed: int = 0, drop_last: bool = False,
                 on_bad_sample: Literal["fail", "skip"] = "fail", check_workers: int = 8, demo_count: int = 8,
                 recheck_files: bool = False, image_root: str | None = None, image_ratio: float | None = None,
                 trigger: str | None = None, roots: list | None = None, caption_dropout: float = 0.0,
                 on_long_caption: Literal["warn", "fail", "truncate"] = "warn"):
        super().__init__()
        self.on_long_caption = on_long_caption  # finetune/data_report.py
        self.trigger, self.roots, self.caption_dropout = trigger, roots, caption_dropout  # caption_options.py
        self.skipped: list[str] = []
        self.root, self.prompt_file, self.video_file, self.image_file = root, prompt_file, video_file, image_file
        self.split, self.dataset_config = split, dataset_config
        self.video_column, self.caption_column, self.image_column = video_column, caption_column, image_column
        self.batch_size, self.num_workers, self.seed, self.drop_last = batch_size, num_workers, seed, drop_last
        self.on_bad_sample, self.check_workers, self.demo_count = on_bad_sample, check_workers, demo_count
        self.recheck_files = recheck_files
        self.image_root, self.image_ratio = image_root, image_ratio
        self.records: list[dict] | None = None
        self.embedded: dict[str, object] = {}  # column datasets of embedded videos/images, by "video"/"image"

    def dataset_root(self) -> Path:
        if self.root == "demo":
            from datamodules.demo_videos import write_demo_videos

            return write_demo_videos(cache_root() / "data" / f"demo_videos_{self.demo_count}", count=self.demo_count)
        return Path(self.root).expanduser()

    def rows(self, with_images: bool) -> list[ClipRow]:
        rows = self._rows_at(self.dataset_root(), self.root, with_images)
        if self.image_root:
            rows += self._rows_at(self._image_root(), self.image_root, with_images=False)
        return rows

    def _image_root(self) -> Path:
        if self.image_root == "demo":
            from datamodules.demo_images import write_demo_images

            return write_demo_images(cache_root() / "data" / f"demo_images_{self.demo_count}", count=self.demo_count)
        root = Path(self.image_root).expanduser()
        if not root.is_dir() or not (has_metadata(root) or has_list_layout(root, self.prompt_file, self.video_file)):
            raise DataError(f"data.image_root={self.image_root!r} is not a folder with metadata.jsonl/.csv (file_name "
                            f"and prompt per image) or {self.prompt_file} + {self.video_file}. Fix the path, or use "
                            f"data.image_root=demo.")
        return root

    def _rows_at(self, root: Path, name: str, with_images: bool) -> list[ClipRow]:
        # ROOT/train/metadata.jsonl (the videofolder layout's split folders: datamodules/layouts.py)
        root = split_folder(root, self.split, self._holds_layout) or root
        if root.is_dir() and has_list_layout(root, self.prompt_file, self.video_file):
            return read_list_layout(root, self.prompt_file, self.video_file, self.image_file, with_images)
        if root.is_dir() and has_metadata(root):
            return read_metadata_layout(root, self.caption_column, self.image_column, with_images)
        return read_dataset(name, self.split, self.dataset_config, self.video_column, self.caption_column,
                            self.image_column, with_images)

    def _holds_layout(self, path: Path) -> bool:
        return path.is_dir() and (has_list_layout(path, self.prompt_file, self.video_file) or has_metadata(path))

    def _check_roots(self, roots) -> list[dict]:
        """`data.roots`: each root checked as `data.root` alone would be, its records repeated."""
        if self.image_root:
            raise DataError("data.image_root with data.roots: list the image folder as one of data.roots instead (the "
                            "images a root lists are one-frame samples too), and set data.image_root=null.")
        records = []
        for entry in roots:
            child = child_module(self, entry.root)
            part = child.check()
            if child.embedded:
                raise DataError(f"data.roots: {entry.root!r} is a dataset of embedded videos; data.roots mixes folders "
                                f"of files. Save its videos as files, or train on it alone with data.root.")
            self.skipped += child.skipped
            records += repeated(part, entry.repeats)
        return records

    def report_rows(self) -> list[dict]:
        """One row per training sample for the data report (finetune/data_report.py)."""
        def first_frame(record):
            video = record["video"] or _load(EmbeddedFile(self.embedded["video"], record["video_row"]))
            return read_image(video) if record.get("kind") == "image" else read_frames(video, [0])[0]

        return [{"kind": r.get("kind", "video"),
                 "file": r["video"] or f"{self.root}[{self.split}] row {r['video_row']}",
                 "caption": r["prompt"], "bucket": tuple(r["bucket"]), "frames": r["frames"],
                 "size": tuple(r.get("size") or ()), "image": r["image"],
                 "thumbnail": functools.partial(first_frame, r)} for r in self.check()]

    # -- check ----------------------------------------------------------------------------------
    def check(self) -> list[dict]:
        """Validate every clip (decoding the frames the run will use) before the model is loaded."""
        if self.records is not None:
            return self.records
        check_dropout(self.caption_dropout)
        roots = parse_roots(self.roots, self.root)
        if roots:
            self.records = self._check_roots(roots)
            return self.records
        spec: VideoSpec = self.require_processor().spec
        if self.on_bad_sample not in ("fail", "skip"):
            raise DataError(f"data.on_bad_sample={self.on_bad_sample!r}: use `fail` (stop, listing every bad clip) "
                            f"or `skip` (leave bad clips out, with a warning each).")
        buckets = [tuple(int(x) for x in b) for b in spec.buckets]
        if not buckets:
            raise DataError("the model family gives no (frames, height, width) bucket to train at.")
        rows = self.rows(spec.conditioning_image)
        refuse_images([str(row.video) for row in rows if is_image_file(row.video)], spec.one_frame,
                      spec.conditioning_image)
        check_image_ratio([is_image_file(row.video) for row in rows], self.image_ratio)  # before any decoding
        for row in rows:
            for name, source in (("video", row.video), ("image", row.image)):
                if isinstance(source, EmbeddedFile):
                    self.embedded[name] = source.column
        records = []
        bad = BadSamples(self.on_bad_sample, what="clip", category=BadSampleWarning)
        checked = CheckedFiles("videos", recheck=self.recheck_files)  # not kept: its lock would not pickle (spawn)
        for outcome in self._probe_all(rows, buckets, spec.conditioning_image, checked):
            if isinstance(outcome, DataError):
                bad.add(str(outcome))
            else:
                records.append(outcome)
        checked.save()
        bad.finish(len(rows))  # fail: raises, listing them all
        self.skipped = list(bad.problems)
        if not records:
            raise DataError(f"data.root={self.root!r}: none of its {len(rows)} clips is usable (each is named in a "
                            f"warning above).")
        self.records = records
        return records

    def _probe_all(self, rows: list[ClipRow], buckets: list, with_image: bool,
                   checked: CheckedFiles) -> list[dict | DataError]:
        """Each row's record or its DataError, in data order, probed in a thread pool (PyAV decodes without the
        GIL): every clip, so that a `fail` lists them all."""
        def probe(row):
            try:
                return self._probe(row, buckets, with_image, checked)
            except DataError as err:
                return err

        return list(check_all(rows, probe, total=len(rows), what="videos", workers=max(1, self.check_workers),
                              progress_from=PROGRESS_FROM))

    def _probe(self, row: ClipRow, buckets: list, with_image: bool, checked: CheckedFiles) -> dict:
        """One clip checked as the run will read it: caption, file, size and bucket, the frames it samples, and
        its conditioning image. Returns its record; raises DataError naming what is wrong and the fix."""
        prompt = with_trigger(_caption(row.prompt, row.where), self.trigger)
        video = _load(row.video)
        _exists(video, row.where, "video", "Fix the path (relative to the data folder) or remove the entry and "
                                           "its caption.")
        if is_image_file(video):  # a one-frame sample (datamodules/video_images.py)
            return probe_image(video, prompt, _origin(video), one_frame_buckets(buckets), checked)
        name = describe(video) if isinstance(video, str) else f"{row.where} (embedded video)"
        if isinstance(video, str) and Path(video).stat().st_size == 0:
            raise DataError(f"{name}: is empty (0 bytes): the data is missing (its copy or download did not finish, "
                            f"or it is a placeholder), not badly encoded. {EMPTY_FIX}")
        origin = _origin(video)
        known = checked.get(origin) or {}
        try:
            frames, height, width = (known["frames"], known["height"], known["width"]) if known else \
                count_frames(video)
        except UndecodableCodec as err:
            raise DataError(f"{name}: the file opens, but {err}. {CODEC_FIX}") from None
        except Exception as err:
            raise DataError(f"{name}: cannot be decoded ({type(err).__name__}: {err}): the file is truncated or "
                            f"corrupt. {CORRUPT_FIX}") from None
        bucket = pick_bucket(frames, height, width, buckets)
        if bucket is None:
            f, h, w = min(buckets, key=bucket_volume)
            raise DataError(f"{name}: has {frames} frames of {height}x{width} (height x width) and fits none of the "
                            f"model's buckets without upscaling; the smallest takes {f} frames of {h}x{w}. Use a "
                            f"clip with at least that many frames and pixels, remove it, or train the model at a "
                            f"smaller size (the model's frame count / height / width settings).")
        indices = frame_indices(frames, bucket[0])
        if known.get("decodes_to", -1) < indices[-1]:  # not yet decoded this far while unchanged
            try:
                check_frames(video, indices)
            except UndecodableCodec as err:
                raise DataError(f"{name}: the file opens, but {err}. {CODEC_FIX}") from None
            except Exception as err:
                raise DataError(f"{name}: {err}, but the run samples frames up to {indices[-1]} (its header says "
                                f"{frames} frames): the file is truncated or corrupt. {CORRUPT_FIX}") from None
            checked.put(origin, {"frames": frames, "height": height, "width": width, "decodes_to": indices[-1]})
        image = _load(row.image) if with_image and row.image is not None else None
        if image is not None:
            _exists(image, row.image_where, "conditioning image",
                    "Fix the path (relative to the data folder), or remove it to start the clip from its first frame.")
            image_origin = _origin(image)
            if not checked.get(image_origin):
                try:
                    read_image(image)
                except Exception as err:
                    image_name = describe(image) if isinstance(image, str) else f"{row.image_where} (embedded image)"
                    raise DataError(f"{image_name}: conditioning image cannot be decoded ({type(err).__name__}: "
                                    f"{err}). Re-save it (PNG/JPEG/WebP) or remove it.") from None
                checked.put(image_origin, {"image": True})
        key = [origin, "x".join(map(str, bucket)), hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:32],
               "prep=" + hashlib.sha256(PREPROCESSING.encode("utf-8")).hexdigest()[:12]]
        if with_image:
            key.append("image=" + (_origin(image) if image is not None else "first-frame"))
        # a path is kept as such; embedded bytes are read again from their dataset row when the clip is decoded
        return {"video": video if isinstance(video, str) else None,
                "video_row": row.video.row if not isinstance(video, str) else -1,
                "image": image if isinstance(image, str) else None,
                "image_row": row.image.row if image is not None and not isinstance(image, str) else -1,
                "frames": frames, "bucket": bucket, "prompt": prompt, "key": "|".join(key), "kind": "video",
                "size": (height, width)}

    # -- setup, samples, loader -----------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        records = self.check()
        table = {name: [r[name] for r in records]
                 for name in ("video", "video_row", "image", "image_row", "frames", "prompt", "key", "kind")}
        table["bucket"] = [list(r["bucket"]) for r in records]
        self.dataset = TableDataset(table, ClipSamples(self.require_processor(), self.embedded))

    def sample_index(self) -> list[tuple[str, tuple]]:
        return [(r["key"], tuple(r["bucket"])) for r in self.check()]

    def bucket_sampler(self, num_replicas: int | None = None, rank: int | None = None) -> VideoBatchSampler:
        records = self.check()
        return VideoBatchSampler([r["bucket"] for r in records], self.batch_size, seed=self.seed,
                                 drop_last=self.drop_last, num_replicas=num_replicas, rank=rank,
                                 is_image=[r["kind"] == "image" for r in records], image_ratio=self.image_ratio)

    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        self._refuse_injected_sampler()
        # Stateful: the batch sampler's position is saved with checkpoints, so a resumed run continues
        # mid-epoch with the batches an uninterrupted run would see.
        # Its own generator: the loader's per-epoch worker seed must not consume the global RNG that
        # the model's noise draws (restored on resume) come from.
        generator = torch.Generator().manual_seed(self.seed)
        return StatefulDataLoader(self.dataset, batch_sampler=self.bucket_sampler(), collate_fn=self.processor.collate,
                                  generator=generator, **self.loader_options())

    def _refuse_injected_sampler(self) -> None:
        """With several processes Lightning would replace the batch sampler's sharding by its own sampler (and
        cannot, for a batch sampler): the recipe must leave the sharding to it."""
        trainer = self.trainer
        if trainer is None or trainer.world_size <= 1:
            return
        if getattr(getattr(trainer, "_accelerator_connector", None), "use_distributed_sampler", False):
            raise DataError("trainer.use_distributed_sampler=true with several processes: VideoDataModule's batch "
                            "sampler shards whole batches across ranks itself. Set trainer.use_distributed_sampler="
                            "false in the recipe (or on the command line).")


class ClipSamples:
    """The training dataset's transform: a batch of clip rows -> processed samples, decoded (frames sampled, resized
    and cropped, the conditioning image). An object holding only what it needs rather than a bound method of the data
    module: a loader pickles its dataset into each worker process under the spawn and forkserver start methods, and
    a bound method would take the data module with it and, once Lightning attached it, the trainer and the model."""

    def __init__(self, processor, embedded: dict):
        self.processor, self.embedded = processor, embedded

    def __call__(self, batch: dict) -> dict:
        return self._decode(batch)

    def _media(self, kind: str, path: str | None, row: int):
        if path is not None:
            return path
        if row >= 0:
            return _load(EmbeddedFile(self.embedded[kind], row))
        return None

    def _decode(self, batch: dict) -> dict:
        with_image = self.processor.spec.conditioning_image
        samples = []
        for i, key in enumerate(batch["key"]):
            num_frames, height, width = batch["bucket"][i]
            source = self._media("video", batch["video"][i], batch["video_row"][i])
            if batch["kind"][i] == "image":  # a one-frame sample: [1, 3, H, W]
                sample = {"video": resize_crop(read_image(source)[None], height, width), "prompt": batch["prompt"][i],
                          "key": key}
                samples.append(self.processor(sample))
                continue
            try:  # check() decoded these frames: this fails only if the file changed since
                frames = read_frames(source, frame_indices(batch["frames"][i], num_frames))
            except Exception as err:
                raise DataError(f"{describe(source)}: cannot be decoded any more ({type(err).__name__}: {err}). "
                                f"{CORRUPT_FIX}") from None
            video = resize_crop(frames, height, width)
            sample = {"video": video, "prompt": batch["prompt"][i], "key": key}
            if with_image:
                image = self._media("image", batch["image"][i], batch["image_row"][i])
                # the named image, resized and cropped like its clip; else the clip's first sampled frame
                sample["image"] = video[0] if image is None else resize_crop(read_image(image)[None], height, width)[0]
            samples.append(self.processor(sample))
        return {name: [s[name] for s in samples] for name in samples[0]}
