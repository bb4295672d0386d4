"""The layouts `VideoDataModule` reads, as rows of (video, caption, conditioning image, where it came from).

- CogVideo finetune layout: `prompts.txt` and `videos.txt` (one caption / one video path per line, paths
  relative to the folder), and for image-to-video an optional `images.txt` (one conditioning image per line).
- A video folder with `metadata.jsonl` or `metadata.csv`: `file_name` plus `prompt`, `text` or `caption`, and
  for image-to-video an optional `image` column (CogKit, Hugging Face video folders).
- A Hugging Face dataset: a `save_to_disk` folder, parquet file(s) or a hub name, with `video_column`,
  `caption_column` and `image_column`. Video columns are read as paths or undecoded bytes
  (`datasets.Video(decode=False)`): `datasets` never decodes them (its decoder needs torchcodec).

Reading a layout checks its structure (files present, lists of equal length, columns there); the media
themselves are checked by the data module, which can skip a bad one (`data.on_bad_sample`).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datamodules.hf_datasets import load_split
from datamodules.textfiles import DataError, decode_utf8_lines, read_lines

CAPTION_COLUMNS = ("prompt", "text", "caption")


@dataclass(frozen=True)
class EmbeddedFile:
    """A file held in a dataset row (`datasets.Video`/`Image(decode=False)`: bytes or a path), read when needed
    so a dataset of embedded videos is never all in memory."""

    column: Any  # a one-column `datasets.Dataset`
    row: int

    def load(self) -> dict:
        value = self.column[self.row]
        return next(iter(value.values()))


@dataclass(frozen=True)
class ClipRow:
    video: str | EmbeddedFile
    prompt: Any  # as the data has it; the data module checks it
    where: str  # "FILE, line N" or "DATASET[split] row N": where to fix it
    image: str | EmbeddedFile | None = None  # the conditioning image; None: the clip's first frame
    image_where: str = ""


def has_list_layout(root: Path, prompt_file: str, video_file: str) -> bool:
    return (root / prompt_file).is_file() or (root / video_file).is_file()


def has_metadata(root: Path) -> bool:
    return (root / "metadata.jsonl").is_file() or (root / "metadata.csv").is_file()


def read_list_layout(root: Path, prompt_file: str, video_file: str, image_file: str,
                     with_images: bool) -> list[ClipRow]:
    """The CogVideo finetune layout; `images.txt` is read only for image-to-video and when present."""
    prompts = read_lines(root / prompt_file, "caption")
    videos = read_lines(root / video_file, "video path")
    if not prompts and not videos:
        raise DataError(f"{root / prompt_file} and {root / video_file} are empty: write one caption and one video "
                        f"path (relative to {root}) per line.")
    if len(prompts) != len(videos):
        raise DataError(f"{root / prompt_file} has {len(prompts)} captions but {root / video_file} has "
                        f"{len(videos)} videos: line i of one must describe line i of the other.")
    images = None
    if with_images and (root / image_file).is_file():
        images = read_lines(root / image_file, "image path")
        if len(images) != len(videos):
            raise DataError(f"{root / image_file} has {len(images)} images but {root / video_file} has "
                            f"{len(videos)} videos: line i names the conditioning image of the clip on line i. Fix "
                            f"it, or delete {image_file} to start every clip from its own first frame.")
    return [ClipRow(video=str(root / name), prompt=prompt, where=f"{root / video_file}, line {line}",
                    image=str(root / images[line - 1]) if images else None,
                    image_where=f"{root / image_file}, line {line}" if images else "")
            for line, (prompt, name) in enumerate(zip(prompts, videos), start=1)]


def _metadata_entries(root: Path) -> list[tuple[Any, str]]:
    jsonl, table = root / "metadata.jsonl", root / "metadata.csv"
    if jsonl.is_file():
        entries = []
        for number, line in enumerate(decode_utf8_lines(jsonl), start=1):
            if not line.strip():
                continue
            try:
                entries.append((json.loads(line), f"{jsonl}, line {number}"))
            except json.JSONDecodeError as err:
                raise DataError(f"{jsonl}, line {number}: not a JSON object ({err.msg}). Each line must look like "
                                '{"file_name": "videos/0001.mp4", "prompt": "a caption"}.') from None
        return entries
    reader = csv.DictReader(decode_utf8_lines(table))
    return [(entry, f"{table}, line {reader.line_num}") for entry in reader]


def read_metadata_layout(root: Path, caption_column: str | None, image_column: str | None,
                         with_images: bool) -> list[ClipRow]:
    """A folder with metadata.jsonl/.csv. The image column (`image` unless named) is optional per row: a row
    without one starts from its clip's first frame."""
    names = [caption_column] if caption_column else list(CAPTION_COLUMNS)
    rows = []
    for entry, where in _metadata_entries(root):
        column = next((c for c in names if c in entry), None) if isinstance(entry, dict) else None
        if column is None or "file_name" not in entry:
            found = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
            raise DataError(f"{where}: needs `file_name` and one of {names}; found {found}.")
        image = entry.get(image_column or "image") if with_images else None
        if image_column and with_images and image_column not in entry:
            raise DataError(f"{where}: data.image_column={image_column!r} is not in this row ({sorted(entry)}). "
                            f"Add it, or set data.image_column=null to start clips without one from their first "
                            f"frame.")
        rows.append(ClipRow(video=str(root / entry["file_name"]), prompt=entry[column], where=where,
                            image=str(root / image) if image else None, image_where=where))
    if not rows:
        raise DataError(f"{root}: its metadata file lists no videos. Add one row per clip (`file_name` and "
                        f"`prompt`).")
    return rows


def _media_column(ds, column: str, feature_type, relative_to: Path, where) -> list:
    """Paths (relative ones resolved against the dataset's folder), or `EmbeddedFile`s for a media feature."""
    feature = ds.features[column]
    if isinstance(feature, feature_type):
        single = ds.select_columns([column]).cast_column(column, feature_type(decode=False))
        return [EmbeddedFile(single, row) for row in range(len(ds))]
    values = []
    for row, value in enumerate(ds[column]):
        if value is None or value == "":
            values.append(None)
        elif isinstance(value, str):
            values.append(value if Path(value).is_absolute() else str(relative_to / value))
        else:
            raise DataError(f"{where(row)}: column {column!r} holds {type(value).__name__}, not a file path or a "
                            f"datasets.{feature_type.__name__} feature.")
    return values


def read_dataset(root: str, split: str, dataset_config: str | None, video_column: str,
                 caption_column: str | None, image_column: str | None, with_images: bool) -> list[ClipRow]:
    import datasets

    ds, relative_to = load_split(
        root, split, dataset_config,
        no_data=f"data.root={root!r} has no prompts.txt/videos.txt, metadata.jsonl/.csv, saved dataset or parquet "
                f"files. See datamodules/video_sources.py for the layouts, or use data.root=demo.",
        no_path=f"data.root={root!r} is not a directory. Point it at the folder holding prompts.txt and videos.txt "
                f"(or metadata.jsonl, or a saved dataset), or use data.root=demo.")
    caption_column = caption_column or next((c for c in CAPTION_COLUMNS if c in ds.column_names), None)
    wanted = [("video_column", video_column), ("caption_column", caption_column)]
    if with_images and image_column:
        wanted.append(("image_column", image_column))
    for name, column in wanted:
        if column not in ds.column_names:
            raise DataError(f"data.{name}={column!r} is not a column of {root!r}; its columns are "
                            f"{ds.column_names}.")
    if len(ds) == 0:
        raise DataError(f"data.root={root!r} (split {split!r}) has no rows.")

    def where(row: int) -> str:
        return f"{root}[{split}] row {row}"

    videos = _media_column(ds, video_column, datasets.Video, relative_to, where)
    image_column = image_column or ("image" if "image" in ds.column_names else None)
    images = (_media_column(ds, image_column, datasets.Image, relative_to, where) if with_images and image_column
              else [None] * len(ds))
    prompts = ds[caption_column]
    return [ClipRow(video=video, prompt=prompt, where=where(row), image=image, image_where=where(row))
            for row, (video, prompt, image) in enumerate(zip(videos, prompts, images))]
