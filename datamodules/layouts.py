"""The split folders of the Hugging Face `imagefolder` / `videofolder` layouts, for images and videos.

`datasets.load_dataset("imagefolder", data_dir=ROOT)` reads a folder whose split folders each hold their own
files and `metadata.jsonl` (or `metadata.csv`)::

    ROOT/train/metadata.jsonl        {"file_name": "0001.png", "prompt": "a caption"}
    ROOT/train/0001.png
    ROOT/validation/metadata.jsonl
    ROOT/test/metadata.jsonl

The split folders are named as `datasets` names them (`datasets.data_files.SPLIT_KEYWORDS`: `train` or `training`;
`validation`, `valid`, `dev` or `val`; `test`, `testing`, `eval` or `evaluation`). `data.split` picks one (`train` by
default); a `file_name` is relative to the split's own folder. A root that holds a layout itself is read as it is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from datamodules.textfiles import DataError

SPLIT_FOLDERS = {"train": ("train", "training"), "validation": ("validation", "valid", "dev", "val"),
                 "test": ("test", "testing", "eval", "evaluation")}


def split_folders(root: Path, holds_layout: Callable[[Path], bool]) -> dict[str, Path]:
    """split -> its folder under `root`, for every split folder that holds a layout (`holds_layout`)."""
    found = {}
    for split, names in SPLIT_FOLDERS.items():
        for name in names:
            if holds_layout(root / name):
                found[split] = root / name
                break
    return found


def split_folder(root: Path, split: str, holds_layout: Callable[[Path], bool]) -> Path | None:
    """The folder to read for `data.split=split`: None when `root` is no folder or holds a layout itself (read as it
    is) or has no split folders; the split's folder; a DataError naming the splits there when `split` is not one."""
    if not root.is_dir() or holds_layout(root):
        return None
    found = split_folders(root, holds_layout)
    if not found:
        return None
    if split in found:
        return found[split]
    direct = root / split
    if holds_layout(direct):  # a split folder named otherwise (e.g. data.split=extra with ROOT/extra/)
        return direct
    raise DataError(f"data.root={root}: its split folders are {sorted(found)} (the imagefolder layout), not "
                    f"{split!r}. Set data.split to one of them.")
