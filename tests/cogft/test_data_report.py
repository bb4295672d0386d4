"""The data report (`cogft data`, and the start of every run): buckets, frames, caption tokens against the text
encoder's limit (`data.on_long_caption`), skipped files; the contact sheet (one tile per sample, logged to W&B as
`data/sheet`); validation prompts from the data when none are given."""

from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest
from conftest import compose
from PIL import Image

from datamodules.demo_videos import write_demo_videos
from finetune.cogft import run as cogft
from finetune.data import DataError
from finetune.data_report import LongCaptionWarning

LONG = ["red " * 20 + "circle", "blue " * 30 + "square", "green " * 17 + "triangle"]  # >= 18 tiny-T5 tokens each


@pytest.fixture(scope="module")
def clips(tmp_path_factory, tiny_cogvideox):
    """Five demo clips in the CogVideo layout, three of them with captions over the tiny preset's 16 T5 tokens."""
    root = write_demo_videos(tmp_path_factory.mktemp("clips") / "data", count=5)
    prompts = (root / "prompts.txt").read_text().splitlines()
    (root / "prompts.txt").write_text("\n".join([LONG[0], prompts[1], LONG[1], prompts[3], LONG[2]]) + "\n")
    return root


def test_report_counts_long_captions_and_buckets(clips, capsys):
    report = cogft(["data", str(clips), "--recipe", "cogvideox_lora", "--preset", "tiny", "--json"])
    printed = json.loads(capsys.readouterr().out)
    assert printed["samples"] == report["samples"] == 5
    assert report["buckets"] == {"9x32x32": 5} and report["encoder"] == "T5" and report["max_tokens"] == 16
    videos = (clips / "videos.txt").read_text().splitlines()
    assert [(row["file"].split("/")[-1], row["tokens"] > 16) for row in report["long_captions"]] == \
        [(videos[0].split("/")[-1], True), (videos[2].split("/")[-1], True), (videos[4].split("/")[-1], True)]
    assert sum(n > 16 for n in report["caption_tokens"]) == 3 and min(report["caption_tokens"]) < 16
    text = cogft(["data", str(clips), "--recipe", "cogvideox_lora", "--preset", "tiny"])
    assert text["long_captions"] == report["long_captions"]
    assert "long captions: 3 of 5 are over 16 tokens" in capsys.readouterr().out


def test_on_long_caption_fail_warn_truncate(clips):
    from finetune.run import build_data

    base = ["recipe=cogvideox_lora", "preset=tiny", f"data.root={clips}"]
    with pytest.raises(DataError, match=r"3 of 5 captions are longer than the 16 T5 tokens .*data.on_long_caption"):
        build_data(compose(base + ["data.on_long_caption=fail"]))
    with pytest.warns(LongCaptionWarning, match="3 of 5 captions"):
        build_data(compose(base))  # warn: the default
    with warnings.catch_warnings():
        warnings.simplefilter("error", LongCaptionWarning)
        assert len(build_data(compose(base + ["data.on_long_caption=truncate"])).report.long) == 3


def test_skipped_files_are_reported_with_why(clips, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(clips, root)
    first = (root / (root / "videos.txt").read_text().splitlines()[1])
    first.write_bytes(b"")
    report = cogft(["data", str(root), "--recipe", "cogvideox_lora", "--preset", "tiny", "--json",
                    "--set", "data.on_bad_sample=skip"])
    assert report["samples"] == 4 and len(report["skipped"]) == 1
    assert first.name in report["skipped"][0] and "empty (0 bytes)" in report["skipped"][0]


def test_contact_sheet_has_one_tile_per_sample(tmp_path):
    sheet = tmp_path / "sheet.png"
    report = cogft(["data", "demo", "--recipe", "cogview4_lora", "--preset", "tiny", "--sheet", str(sheet),
                    "--set", "data.demo_count=5"])
    with Image.open(sheet) as image:
        tiles = json.loads(image.text["cogft:tiles"])
        pixels = np.asarray(image.convert("RGB"))
    assert report["tiles"] == report["samples"] == len(tiles) == 5
    assert len({t["file"] for t in tiles}) == 5
    assert sorted(json.dumps(t["bucket"]) for t in tiles) == sorted(
        json.dumps([int(x) for x in b.split("x")]) for b, n in report["buckets"].items() for _ in range(n))
    for tile in tiles:  # a picture in every tile (the sheet's background is one flat grey)
        x0, y0, x1, y1 = tile["box"]
        assert pixels[y0:y1, x0:x1].std() > 10


def test_a_run_logs_the_report_and_sheet_to_wandb(tmp_path, tiny_cogvideox):
    from test_grids import wandb_history

    from finetune.run import train

    train(compose(["recipe=cogvideox_lora", "preset=tiny", "logger=wandb", f"run_dir={tmp_path}",
                   "trainer.max_steps=1", "callbacks.samples=null", "callbacks.export=null",
                   "callbacks.checkpoint=null", "data.demo_count=3"]))
    with Image.open(tmp_path / "data_sheet.png") as image:
        assert len(json.loads(image.text["cogft:tiles"])) == 3
    (run,) = tmp_path.glob("wandb/offline-run-*")
    assert len(list((run / "files" / "media").glob("images/data/sheet_*.png"))) == 1
    history = wandb_history(run)
    assert "data/sheet/path" in history and "data/report/path" in history


def test_validation_prompts_come_from_the_dataset(tmp_path, tiny_cogvideox):
    """A user's data and no callbacks.samples.prompts: the recipe's default takes the data's own captions (and for
    image-to-video their clips' first frames), spread over the dataset."""
    from finetune.run import build_data
    from finetune.validation_prompts import requests_from_data

    root = write_demo_videos(tmp_path / "mine", count=4)
    captions = [f"my subject number {i} walks" for i in range(4)]
    (root / "prompts.txt").write_text("\n".join(captions) + "\n")
    assert compose(["recipe=cogvideox_i2v_lora"]).callbacks.samples.prompts is None
    cfg = compose(["recipe=cogvideox_i2v_lora", "preset=tiny", f"data.root={root}", "callbacks.samples.prompts=null",
                   "data.on_long_caption=truncate"])
    requests = requests_from_data(build_data(cfg), cfg.callbacks.samples.data_prompts, tmp_path / "run")
    assert [r.prompt for r in requests] == [captions[0], captions[3]]
    first = (root / (root / "videos.txt").read_text().splitlines()[3])
    import av

    with av.open(str(first)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    np.testing.assert_array_equal(np.asarray(Image.open(requests[1].image)), frame)


def test_report_and_sheet_of_images_among_videos(tmp_path, tiny_cogvideox):
    """Images in video training (one-frame samples, data.image_root): counted by kind, in their 1 x H x W buckets,
    drawn in the sheet as themselves."""
    sheet = tmp_path / "sheet.png"
    report = cogft(["data", "demo", "--recipe", "cogvideox_lora", "--preset", "tiny", "--json", "--sheet", str(sheet),
                    "--set", "data.image_root=demo", "--set", "data.demo_count=3"])
    assert report["kinds"] == {"video": 3, "image": 3} and report["samples"] == report["tiles"] == 6
    assert sum(n for b, n in report["buckets"].items() if b.startswith("1x")) == 3
    assert report["frames"] == {17: 3}  # the clips' own frame counts; images have none
    with Image.open(sheet) as image:
        assert sorted(t["bucket"][0] for t in json.loads(image.text["cogft:tiles"])) == [1, 1, 1, 9, 9, 9]
