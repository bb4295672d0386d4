"""Image-caption data for text-to-image recipes, on Hugging Face `datasets`, in aspect-ratio buckets.

Sources (`data.root`):
- an image folder with `metadata.jsonl` or `metadata.csv` (columns `file_name` and `text` or `prompt`):
  the Hugging Face `imagefolder` layout that CogKit's t2i data also uses;
- a dataset written by `Dataset.save_to_disk`, a parquet file or folder of parquet files, or a Hugging Face
  hub dataset name (`image_column` / `caption_column` name the columns);
- `demo`: a generated set of coloured shapes with English and Chinese captions (datamodules/demo_images.py).

`check()` reads every caption and decodes every image in full (in parallel) before the model is loaded, so a bad
caption file, a missing, unreadable or cut-off image, an image smaller than the smallest bucket, or an empty caption
stops the run with the file (and line) named, or with `on_bad_sample=skip` is left out with a warning.
Each image goes to the bucket nearest its aspect ratio (datamodules/buckets.py; the buckets' area and limits
are the model family's `finetune.data.ImageSpec`, handed over by the engine), is resized to cover the bucket
and centre-cropped, and scaled to [-1, 1]. Batches: `image` [B, 3, H, W], `prompt`, `key`.

Control recipes (CogView4 control: the family's `ImageSpec.control_image`) also get `control_image` [B, 3, H, W],
each resized and cropped into its image's bucket: a file paired with the image, or computed from it (`data.control`:
datamodules/controls.py); the pair is checked with the image and part of its sample key (so of the encoded cache).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

from datamodules import controls as control_sources
from datamodules.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from datamodules.caption_options import check_dropout, parse_roots, with_trigger
from datamodules.hf_datasets import load_split
from datamodules.layouts import split_folder
from datamodules.sample_checks import BadSamples, CheckedFiles, OnBadSample, check_all
from datamodules.table import TableDataset
from datamodules.textfiles import DataError, decode_utf8_lines
from finetune.data import FamilyDataModule, ImageSpec
from finetune.hub import cache_root

CAPTION_COLUMNS = ("text", "prompt", "caption")
EXIF_TRANSPOSED = (5, 6, 7, 8)  # orientations that swap width and height
# How an image becomes pixels, part of every sample key (so of the encoded cache's keys): change it with the code.
PREPROCESSING = "exif-transpose;rgb;resize=bicubic-cover;crop=centre;range=-1..1"


def _has_metadata(path: Path) -> bool:
    return path.is_dir() and ((path / "metadata.jsonl").is_file() or (path / "metadata.csv").is_file())


def combine_roots(module, roots) -> dict:
    """The table of `data.roots`: each root checked as `data.root` alone would be, its rows repeated."""
    from datamodules.caption_options import child_module, repeated

    table: dict[str, list] = {}
    for entry in roots:
        child = child_module(module, entry.root)
        part = child.check()
        if not isinstance(part["images"], list):
            raise DataError(f"data.roots: {entry.root!r} is a dataset of embedded images; data.roots mixes folders "
                            f"of files (imagefolder, metadata.jsonl). Save its images as files, or train on it alone "
                            f"with data.root.")
        module.skipped += child.skipped
        for name, values in part.items():  # images, prompt, key, bucket, size (and control_image)
            table.setdefault(name, []).extend(repeated(list(values), entry.repeats))
    return table


def read_metadata(root: Path, caption_column: str | None) -> list[tuple[str, str, str]]:
    """(image path, caption, where) rows of `root/metadata.jsonl` or `root/metadata.csv`."""
    names = [caption_column] if caption_column else list(CAPTION_COLUMNS)
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    rows = []
    if jsonl.is_file():
        for number, line in enumerate(decode_utf8_lines(jsonl), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{jsonl}, line {number}: not a JSON object ({err.msg}). Each line must look like "
                                '{"file_name": "0001.png", "text": "a caption"}.') from None
            rows.append((entry, f"{jsonl}, line {number}"))
    elif table.is_file():
        reader = csv.DictReader(decode_utf8_lines(table))
        rows = [(entry, f"{table}, line {reader.line_num}") for entry in reader]
    else:
        raise DataError(f"data.root={root}: no metadata.jsonl or metadata.csv. Add one with a `file_name` and a "
                        f"`text` (or `prompt`) column per image, or use data.root=demo.")
    records = []
    for entry, where in rows:
        column = next((c for c in names if c in entry), None) if isinstance(entry, dict) else None
        if column is None or "file_name" not in entry:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{where}: needs `file_name` and one of {names}; found {found}.")
        records.append((str(root / entry["file_name"]), entry[column], where))
    return records


def _caption(value, where: str) -> str:
    if isinstance(value, (list, tuple)):  # several captions per image (COCO style): take the first
        value = next((v for v in value if isinstance(v, str) and v.strip()), "")
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"{where}: empty or missing caption ({value!r}). Fill it in or remove the entry.")
    return value.strip()


def _resolve(source, relative_to: Path):
    """An image given as a relative path string is relative to the dataset's folder."""
    if isinstance(source, str) and not Path(source).is_absolute():
        return str(relative_to / source)
    return source


def _open(source) -> Image.Image:
    """`source`: a path, or a `datasets.Image(decode=False)` dict with `bytes` or `path`."""
    if isinstance(source, dict):
        return Image.open(io.BytesIO(source["bytes"])) if source.get("bytes") else Image.open(source["path"])
    return Image.open(source)


def _describe(source, where: str) -> str:
    if isinstance(source, dict):
        return f"{where} ({source.get('path') or 'embedded image bytes'})"
    return str(source)


def image_size(source, where: str) -> tuple[int, int]:
    """(height, width) after EXIF rotation, decoding the whole image (a body cut short passes a header check and
    would crash mid-epoch); a missing or undecodable file is a DataError that names it."""
    try:
        with _open(source) as image:
            image.load()
            width, height = image.size
            transposed = image.getexif().get(0x0112) in EXIF_TRANSPOSED
    except FileNotFoundError:
        raise DataError(f"{where}: image {_describe(source, where)} does not exist. Fix `file_name` (relative to "
                        f"the data folder) or remove the entry.") from None
    except Exception as err:  # PIL raises many types for broken files (OSError, SyntaxError, struct.error, ...)
        raise DataError(f"{_describe(source, where)}: not a readable image ({type(err).__name__}: {err}). "
                        f"Re-save it (PNG/JPEG/WebP) or remove it.") from None
    return (width, height) if transposed else (height, width)


def check_size(size: tuple[int, int], buckets: list[tuple[int, int]], described: str) -> None:
    """An image with a side under every bucket's shortest side would be upscaled into blur: a DataError."""
    shortest = min(min(bucket) for bucket in buckets)
    if min(size) < shortest:
        smallest = min(buckets, key=lambda hw: (hw[0] * hw[1], hw))
        raise DataError(f"{described}: {size[0]}x{size[1]} pixels (HxW) is smaller than the smallest bucket "
                        f"{smallest[0]}x{smallest[1]} (no bucket side is under {shortest}); it would be upscaled "
                        f"{shortest / min(size):.1f}x. Use a larger image or remove it, or lower model.min_side "
                        f"(and model.bucket_pixels) to train at smaller sizes.")


def _origin(source) -> str:
    """The file by path, size and mtime; embedded bytes by their hash (FileNotFoundError for a missing file)."""
    if isinstance(source, dict) and source.get("bytes"):
        return hashlib.sha256(source["bytes"]).hexdigest()[:32]
    path = Path(source["path"] if isinstance(source, dict) else source)
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _source_key(origin: str, caption: str, bucket: tuple[int, int]) -> str:
    """Changes when the file (`_origin`), the caption, the bucket or the preprocessing changes: the encoded cache's
    key (finetune/cache.py)."""
    text = hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]
    preprocessing = hashlib.sha256(PREPROCESSING.encode("utf-8")).hexdigest()[:12]
    return f"{origin}|{bucket[0]}x{bucket[1]}|{text}|prep={preprocessing}"


def resize_crop(image: Image.Image, height: int, width: int) -> torch.Tensor:
    """Scale to cover (height, width), crop the centre, RGB -> float [3, height, width] in [-1, 1]."""
    from PIL import ImageOps

    image = ImageOps.exif_transpose(image).convert("RGB")
    scale = max(height / image.height, width / image.width)
    new_w, new_h = max(width, round(image.width * scale)), max(height, round(image.height * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    image = image.crop((left, top, left + width, top + height))
    array = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
    return (array / 127.5 - 1.0).clamp(-1.0, 1.0)


class ImageDataModule(FamilyDataModule):
    """Args:
        root: `demo`, an image folder with metadata.jsonl/.csv, a `save_to_disk` folder, a parquet file or
            folder, or a hub dataset name (see the module docstring).
        split: the split of a dataset with several (save_to_disk DatasetDict, hub, parquet).
        image_column: the image column of a dataset (an `Image` feature or file paths).
        caption_column: the caption column; null takes the first of text, prompt, caption.
        dataset_config: the configuration name of a hub dataset that has several.
        batch_size: per device; a batch never mixes buckets.
        num_workers: decoding processes.
        seed: the order of the batches (independent of the model's noise draws).
        drop_last: drop each bucket's last incomplete batch (keeps every batch full).
        demo_count: images in the generated demo set.
        on_bad_sample: `fail` stops before training on a missing, undecodable or too small image or an empty
            caption, naming every one; `skip` leaves each out with a warning and counts them.
        recheck_files: decode every image in `check()` even when an earlier check decoded it, unchanged (same
            path, size and mtime, or the same embedded bytes): `<kit cache>/checked/images.jsonl`.
        control: where each sample's control image comes from, for control recipes (datamodules/controls.py):
            `pairs` (the `control_column` or a `controls/` folder), `canny` (computed from the image),
            `depth_from_file` (a `depth/` folder); null: none (text-to-image).
        control_column: the column naming each image's control image (`pairs`).
        canny_low, canny_high: `cv2.Canny`'s hysteresis thresholds (`canny`): lower ones keep fainter edges.
        trigger: a word put in front of every caption (`"TRIGGER, caption"`; datamodules/caption_options.py).
        roots: several folders mixed, `[{root, repeats}]`, instead of `root`.
        caption_dropout: the fraction of training samples trained with the empty prompt.
    The buckets' area and limits come from the model family (`connect`).
    """

    spec_type = ImageSpec
    # checked by finetune.settings.check
    setting_ranges = {"batch_size": ">=1", "num_workers": ">=0", "demo_count": ">=1", "canny_low": ">=0",
                      "canny_high": ">=0"}

    def __init__(self, root: str | None, split: str = "train", image_column: str = "image",
                 caption_column: str | None = None, dataset_config: str | None = None, batch_size: int = 1,
                 num_workers: int = 0, seed: int = 0, drop_last: bool = False, demo_count: int = 12,
                 on_bad_sample: OnBadSample = "fail", recheck_files: bool = False, control: str | None = None,
                 control_column: str = "control_image", canny_low: int = 100, canny_high: int = 200,
                 trigger: str | None = None, roots: list | None = None, caption_dropout: float = 0.0,
                 on_long_caption: Literal["warn", "fail", "truncate"] = "warn"):
        super().__init__()
        self.control, self.control_column, self.canny = control, control_column, (canny_low, canny_high)
        self.canny_low, self.canny_high = canny_low, canny_high  # as given (data.roots: each root's module)
        self.on_long_caption = on_long_caption  # finetune/data_report.py
        self.trigger, self.roots, self.caption_dropout = trigger, roots, caption_dropout
        self.skipped: list[str] = []
        self.on_bad_sample, self.recheck_files = on_bad_sample, recheck_files
        self.root, self.split, self.dataset_config = root, split, dataset_config
        self.image_column, self.caption_column = image_column, caption_column
        self.batch_size, self.num_workers, self.seed, self.drop_last = batch_size, num_workers, seed, drop_last
        self.demo_count = demo_count
        self.table: dict | None = None

    # -- sources --------------------------------------------------------------------------------
    def _folder(self) -> Path | None:
        if self.root == "demo":
            from datamodules.demo_images import write_demo_images

            return write_demo_images(cache_root() / "data" / f"demo_images_{self.demo_count}", count=self.demo_count)
        path = Path(self.root).expanduser()
        split = split_folder(path, self.split, _has_metadata)  # ROOT/train/metadata.jsonl (datamodules/layouts.py)
        if split is not None:
            return split
        if _has_metadata(path):
            return path
        return None

    def _dataset(self):
        """A `datasets.Dataset` with its image column undecoded (paths or bytes)."""
        import datasets

        ds, relative_to = load_split(
            self.root, self.split, self.dataset_config,
            no_data=f"data.root={self.root!r} has no metadata.jsonl, metadata.csv, saved dataset or parquet files. "
                    f"See datamodules/images.py for the layouts, or use data.root=demo.",
            no_path=f"data.root={self.root!r}: no such file or directory.")
        caption_column = self.caption_column or next((c for c in CAPTION_COLUMNS if c in ds.column_names), None)
        for name, column in (("image_column", self.image_column), ("caption_column", caption_column)):
            if column not in ds.column_names:
                raise DataError(f"data.{name}={column!r} is not a column of {self.root!r}; its columns are "
                                f"{ds.column_names}.")
        names = {self.image_column: "image", caption_column: "prompt"}
        if self.control == "pairs":
            if self.control_column not in ds.column_names:
                raise DataError(f"data.control=pairs: data.control_column={self.control_column!r} is not a column of "
                                f"{self.root!r}; its columns are {ds.column_names}.")
            names[self.control_column] = "control_image"
        elif self.control == "depth_from_file":
            raise DataError(f"data.control=depth_from_file reads a depth/ folder beside the images: data.root="
                            f"{self.root!r} is not an image folder; give the depth maps as data.control=pairs with "
                            f"data.control_column.")
        ds = ds.select_columns(list(names))
        for column in names:
            if names[column] != "prompt" and isinstance(ds.features[column], datasets.Image):
                ds = ds.cast_column(column, datasets.Image(decode=False))
        return ds.rename_columns(names), relative_to

    def check_control(self, spec: ImageSpec) -> None:
        """The family needs a control image exactly when `data.control` gives one."""
        control_sources.check_mode(self.control)
        if spec.control_image and self.control is None:
            raise DataError("this model trains on image + control image pairs: set data.control=pairs (a "
                            "control_image column or a controls/ folder), canny or depth_from_file "
                            "(datamodules/controls.py).")
        if self.control is not None and not spec.control_image:
            raise DataError(f"data.control={self.control}: this model takes no control image; remove data.control "
                            f"or use a control recipe (cogview4_control_lora).")

    # -- check, setup, loader -------------------------------------------------------------------
    def check(self) -> dict:
        """Validate captions, images (each decoded in full, in parallel) and sizes before the model is loaded; a bad
        sample fails the run or, with `on_bad_sample=skip`, is left out (named in a warning)."""
        if self.table is not None:
            return self.table
        check_dropout(self.caption_dropout)
        roots = parse_roots(self.roots, self.root)
        if roots:
            self.table = combine_roots(self, roots)
            return self.table
        spec: ImageSpec = self.require_processor().spec
        self.check_control(spec)
        buckets = make_buckets(target_pixels=spec.pixels, min_side=spec.min_side, max_side=spec.max_side,
                               multiple=spec.multiple, max_pixels=spec.max_pixels)
        folder = self._folder()
        if folder is not None:
            rows, base = read_metadata(folder, self.caption_column), None
            total = len(rows)
            paired = control_sources.control_files(folder, [r[0] for r in rows], self.control, self.control_column) \
                if self.control else [None] * total
            rows = [(*row, control) for row, control in zip(rows, paired)]
        else:
            base, relative_to = self._dataset()
            total = len(base)
            rows = ((_resolve(row["image"], relative_to), row["prompt"], f"{self.root}[{self.split}] row {index}",
                     _resolve(row["control_image"], relative_to) if self.control == "pairs" else None)
                    for index, row in enumerate(base))  # lazily: embedded images are not all held in memory
        if not total:
            raise DataError(f"data.root={self.root!r}{'' if folder else f' (split {self.split!r})'} holds no images. "
                            f"Point data.root at a non-empty dataset, or use data.root=demo.")

        checked = CheckedFiles("images", recheck=self.recheck_files)

        def decoded(source, where: str) -> tuple[str, tuple[int, int]]:
            """The file's origin and size, decoding it in full once (a missing file: the DataError that names it)."""
            try:
                origin = _origin(source)
            except FileNotFoundError:
                image_size(source, where)  # raises the DataError that names the missing file and the fix
                raise
            known = checked.get(origin)
            size = tuple(known["size"]) if known else image_size(source, where)
            checked.put(origin, {"size": list(size)})
            return origin, size

        def examine(row) -> tuple | str:
            source, caption, where, control = row
            try:
                caption = with_trigger(_caption(caption, where), self.trigger)
                origin, size = decoded(source, where)
                check_size(size, buckets, _describe(source, where))
                if control is not None:  # a paired file: it exists, decodes, and is the image's size
                    control_origin, control_size = decoded(control, f"{where} (control image)")
                    control_sources.check_pair(size, control_size, _describe(source, where),
                                               _describe(control, f"{where} control_image"))
            except DataError as err:
                return str(err)
            bucket = nearest_bucket(*size, buckets)
            key = _source_key(origin, caption, bucket)
            if self.control is not None:  # the control is part of the sample: its file, or how it is computed
                key += f"|control={self.control}:" + (control_origin if control is not None else
                                                      f"{self.canny[0]},{self.canny[1]}")
            return source, caption, bucket, key, control, size

        bad = BadSamples(self.on_bad_sample)
        paths, prompts, keys, sizes, kept, paired, originals = [], [], [], [], [], [], []
        for index, result in enumerate(check_all(rows, examine, total=total)):
            if isinstance(result, str):
                bad.add(result)
                continue
            source, caption, bucket, key, control, size = result
            originals.append(size)
            paired.append(control if isinstance(control, str) else None)
            kept.append(index)
            prompts.append(caption)
            sizes.append(bucket)
            keys.append(key)
            paths.append(source if isinstance(source, str) else None)
        checked.save()
        bad.finish(total)
        self.skipped = list(bad.problems)
        if not prompts:
            raise DataError(f"data.root={self.root!r}: all {total} images were left out as bad "
                            f"(data.on_bad_sample=skip; see the warnings above). Fix them or use other data.")
        embedded = base is not None and not isinstance(paths[0], str)
        if embedded:
            images = base.select_columns(["image", "control_image"] if self.control == "pairs" else ["image"])
            images = images.select(kept) if len(kept) < total else images
        self.table = {"images": images if embedded else paths, "prompt": prompts, "key": keys, "bucket": sizes,
                      "size": originals}
        if self.control is not None and not embedded:
            self.table["control_image"] = paired
        return self.table

    def report_rows(self) -> list[dict]:
        """One row per training sample for the data report (finetune/data_report.py): the file, its caption, its
        bucket and its own size."""
        table = self.check()
        images = table["images"]
        files = images if isinstance(images, list) else [f"{self.root}[{self.split}] row {i}" for i in
                                                         range(len(table["prompt"]))]
        def picture(i):
            from datamodules.video_io import read_image

            return read_image(images[i] if isinstance(images, list) else images[i]["image"])

        return [{"kind": "image", "file": str(file), "caption": caption, "bucket": (1, *bucket), "frames": 1,
                 "size": tuple(size), "thumbnail": functools.partial(picture, i)}
                for i, (file, caption, bucket, size) in enumerate(zip(files, table["prompt"], table["bucket"],
                                                                      table["size"]))]

    def setup(self, stage: str | None = None) -> None:
        table = self.check()
        images = table["images"]
        columns = {"prompt": table["prompt"], "key": table["key"], "height": [h for h, _ in table["bucket"]],
                   "width": [w for _, w in table["bucket"]]}
        transform = ImageSamples(self.require_processor(), self.control, self.canny)
        if "control_image" in table:
            columns["control_image"] = table["control_image"]
        if isinstance(images, list):  # file paths: a plain table (no `datasets` import, no Arrow copy)
            self.dataset = TableDataset({"image": images, **columns}, transform)
            return
        ds = images  # the source dataset's image column: embedded images stay in Arrow, on disk
        for name, values in columns.items():
            ds = ds.add_column(name, values)
        self.dataset = ds.with_transform(transform)

    def sample_index(self) -> list[tuple[str, tuple]]:
        table = self.check()
        return [(key, tuple(bucket)) for key, bucket in zip(table["key"], table["bucket"])]

    def bucket_sampler(self) -> BucketBatchSampler:
        return BucketBatchSampler(self.check()["bucket"], self.batch_size, seed=self.seed, drop_last=self.drop_last)

    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # Stateful: the bucket sampler's position is saved with checkpoints, so a resumed run continues
        # mid-epoch with the same next batch.
        # Its own generator: the loader's per-epoch worker seed must not consume the global RNG that the
        # model's noise draws (restored on resume) come from.
        generator = torch.Generator().manual_seed(self.seed)
        return StatefulDataLoader(self.dataset, batch_sampler=self.bucket_sampler(), collate_fn=self.processor.collate,
                                  generator=generator, **self.loader_options())


class ImageSamples:
    """The training dataset's transform: a batch of image rows -> processed samples, decoded (resized and cropped to
    the row's bucket). An object holding only what it needs rather than a bound method of the data module: `datasets`
    fingerprints a transform by pickling it, and loaders pickle their dataset into spawned workers; a bound method
    would take the data module with it and, once Lightning attached it, the trainer and the model."""

    def __init__(self, processor, control: str | None = None, canny: tuple[int, int] = (100, 200)):
        self.processor, self.control, self.canny = processor, control, canny

    def __call__(self, batch: dict) -> dict:
        samples = []
        controls = batch.get("control_image") or [None] * len(batch["key"])
        for source, height, width, prompt, key, control in zip(batch["image"], batch["height"], batch["width"],
                                                               batch["prompt"], batch["key"], controls):
            pixels = _pixels(source, height, width)
            sample = {"image": pixels, "prompt": prompt, "key": key}
            if self.control == "canny":
                sample["control_image"] = control_sources.canny(pixels, *self.canny)
            elif self.control is not None:
                convert = control_sources.depth_to_rgb if self.control == "depth_from_file" else None
                sample["control_image"] = _pixels(control, height, width, convert)
            samples.append(self.processor(sample))
        return {name: [s[name] for s in samples] for name in samples[0]}


def _pixels(source, height: int, width: int, convert=None) -> torch.Tensor:
    try:
        with _open(source) as image:
            return resize_crop(image if convert is None else convert(image), height, width)
    except Exception as err:  # a truncated body passes the header check: still name the file
        raise DataError(f"{_describe(source, 'dataset row')}: cannot be decoded ({type(err).__name__}: "
                        f"{err}). Re-save or remove it.") from None
