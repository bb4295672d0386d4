"""The imagefolder / videofolder layouts with split folders (`train/`, `validation/`, `test/`), as `datasets` reads
them, for images and videos."""

from __future__ import annotations

import json

import datasets
import pytest
from PIL import Image

from datamodules.images import ImageDataModule
from datamodules.textfiles import DataError
from datamodules.video import VideoDataModule
from finetune.data import ImageSpec, Processor, VideoSpec

TINY = ImageSpec(pixels=4096, min_side=32, max_side=64, multiple=32, max_pixels=4096)


def write_split(folder, captions, size=(64, 64)):
    folder.mkdir(parents=True)
    rows = []
    for i, caption in enumerate(captions):
        Image.new("RGB", size[::-1], (40 * i, 90, 160)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "prompt": caption})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def images(root, **kw) -> ImageDataModule:
    data = ImageDataModule(root=str(root), **kw)
    data.connect(Processor(TINY))
    return data


def test_imagefolder_with_train_split_reads_as_datasets_does(tmp_path):
    write_split(tmp_path / "train", ["a red square", "a blue square", "a green square"])
    write_split(tmp_path / "validation", ["a held-out square"])
    table = images(tmp_path).check()
    theirs = datasets.load_dataset("imagefolder", data_dir=str(tmp_path))  # the layout as `datasets` reads it
    assert sorted(theirs) == ["train", "validation"]
    assert table["prompt"] == theirs["train"]["prompt"] == ["a red square", "a blue square", "a green square"]
    assert [p.split("/")[-2:] for p in table["images"]] == [["train", f"{i}.png"] for i in range(3)]
    assert images(tmp_path, split="validation").check()["prompt"] == ["a held-out square"]
    with pytest.raises(DataError, match=r"split folders are \['train', 'validation'\].*not 'test'.*data.split"):
        images(tmp_path, split="test").check()


def test_datasets_split_folder_names(tmp_path):
    write_split(tmp_path / "training", ["one"])
    write_split(tmp_path / "val", ["two"])
    assert images(tmp_path).check()["prompt"] == ["one"]
    assert images(tmp_path, split="validation").check()["prompt"] == ["two"]


def test_videofolder_with_split_folders(tmp_path):
    from datamodules.demo_videos import write_demo_videos

    demo = write_demo_videos(tmp_path / "demo", count=3)
    prompts = (demo / "prompts.txt").read_text().splitlines()
    videos = (demo / "videos.txt").read_text().splitlines()
    for split, picked in (("train", [0, 1]), ("test", [2])):
        folder = tmp_path / "folder" / split
        folder.mkdir(parents=True)
        lines = []
        for i in picked:
            (folder / f"{i}.mp4").write_bytes((demo / videos[i]).read_bytes())
            lines.append(json.dumps({"file_name": f"{i}.mp4", "prompt": prompts[i]}))
        (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    spec = VideoSpec(buckets=((9, 32, 32),))

    def clips(split):
        data = VideoDataModule(root=str(tmp_path / "folder"), split=split, check_workers=1)
        data.connect(Processor(spec))
        return [r["prompt"] for r in data.check()]

    assert clips("train") == prompts[:2]
    assert clips("test") == prompts[2:]
