"""The video data module: layout, decoding, sampling, and the errors a user can cause."""

from __future__ import annotations

import numpy as np
import pytest

from datamodules.demo_videos import render, write_demo_videos
from datamodules.textfiles import DataError
from datamodules.video import VideoDataModule, frame_indices, resize_crop
from datamodules.video_io import count_frames
from finetune.data import ImageSpec, Processor, VideoSpec
from finetune.media import write_video


@pytest.fixture()
def dataset(tmp_path):
    return write_demo_videos(tmp_path / "data", count=3, frames=17, size=48)


def module(root, **kw) -> VideoDataModule:
    """The data module connected as the engine connects it, to a family's processor (32x32, 9 frames)."""
    dm = VideoDataModule(root=str(root), **kw)
    dm.connect(Processor(VideoSpec(height=32, width=32, num_frames=9)))
    return dm


def test_demo_dataset_layout_and_batches(dataset):
    dm = module(dataset, batch_size=2)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (2, 9, 3, 32, 32)
    assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert all("moves" in p for p in batch["prompt"]) and len(batch["key"]) == 2
    assert count_frames(dataset / "videos" / sorted(p.name for p in (dataset / "videos").iterdir())[0])[0] == 17


def test_demo_generator_is_deterministic(tmp_path):
    a = write_demo_videos(tmp_path / "a", count=2)
    b = write_demo_videos(tmp_path / "b", count=2)
    assert (a / "prompts.txt").read_text() == (b / "prompts.txt").read_text()
    assert (a / "videos.txt").read_text() == (b / "videos.txt").read_text()


def test_caption_describes_the_motion():
    video = render("red", "square", "right", frames=9, size=32)
    xs = [np.nonzero(frame[..., 0] > 100)[1].mean() for frame in video]
    assert xs[-1] > xs[0] + 5  # moves right
    assert video[0][..., 0].max() == 230 and video[0][..., 2].max() == 40  # red


def test_frame_sampling_and_resize():
    assert frame_indices(17, 9) == list(range(9))
    assert frame_indices(49, 9) == list(range(0, 45, 5))
    frames = np.zeros((2, 40, 80, 3), dtype=np.uint8)
    frames[:, :, 30:50] = 255  # a bright vertical band in the centre
    out = resize_crop(frames, 32, 32)
    assert out.shape == (2, 3, 32, 32)
    assert out[0, 0, 16, 16] > 0.9 and out[0, 0, 16, 0] < -0.9  # centre kept, sides cropped


def test_count_mismatch_names_both_files(dataset):
    (dataset / "prompts.txt").write_text("only one caption\n")
    with pytest.raises(DataError, match=r"prompts.txt has 1 captions but .*videos.txt has 3 videos"):
        module(dataset).check()


def test_missing_video_names_line_and_path(dataset):
    lines = (dataset / "videos.txt").read_text().splitlines()
    (dataset / lines[1]).unlink()
    with pytest.raises(DataError, match=r"videos.txt, line 2: .*does not exist"):
        module(dataset).check()


def test_unreadable_video_is_named(dataset):
    lines = (dataset / "videos.txt").read_text().splitlines()
    (dataset / lines[0]).write_bytes(b"not a video")
    with pytest.raises(DataError, match=rf"{lines[0]}: cannot be decoded.*Re-encode"):
        module(dataset).check()


def test_too_short_video_says_how_many_frames(tmp_path):
    root = tmp_path / "short"
    write_video(root / "v.mp4", np.zeros((5, 32, 32, 3), dtype=np.uint8))
    (root / "prompts.txt").write_text("a clip\n")
    (root / "videos.txt").write_text("v.mp4\n")
    with pytest.raises(DataError, match=r"v.mp4: has 5 frames but model.num_frames=9"):
        module(root).check()


@pytest.mark.parametrize("kw, message", [
    ({"num_frames": 10}, r"model.num_frames=10 is not 8N\+1.*Use 9 or 17"),
    ({"height": 40}, r"model.height=40 is not a multiple of 16.*Use 32 or 48"),
])
def test_unsupported_sizes_are_the_familys_rule_checked_before_loading(tiny_cogvideox, kw, message):
    from recipes.cogvideox import CogVideoX

    settings = {"path": tiny_cogvideox, "height": 32, "width": 32, "num_frames": 9, **kw}
    with pytest.raises(DataError, match=message):
        CogVideoX.data_processor(**settings)


def test_a_processor_of_the_wrong_kind_is_refused(dataset):
    dm = VideoDataModule(root=str(dataset))
    with pytest.raises(DataError, match="needs a model family that describes its data as VideoSpec.*ImageSpec"):
        dm.connect(Processor(ImageSpec(pixels=4096, min_side=32, max_side=64, multiple=32, max_pixels=4096)))


def test_non_utf8_caption_names_the_line(dataset):
    (dataset / "prompts.txt").write_bytes("ok\n".encode() + "坏的".encode("gbk") + b"\nok\n")
    with pytest.raises(DataError, match=r"prompts.txt, line 2: not valid UTF-8"):
        module(dataset).check()


def test_missing_root_suggests_demo(tmp_path):
    with pytest.raises(DataError, match=r"data.root=.* is not a directory.*data.root=demo"):
        module(tmp_path / "nope").check()


def test_resumed_loader_continues_mid_epoch(dataset):
    """The stateful loader: batches after a restore equal those of an uninterrupted pass."""
    dm = module(dataset, batch_size=1)
    dm.setup("fit")
    loader = dm.train_dataloader()
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = [b["key"] for b in it]
    fresh = dm.train_dataloader()
    fresh.load_state_dict(state)
    assert [b["key"] for b in fresh] == rest and len(rest) == 2
