"""The video data module: layouts, buckets, conditioning images, decoding, sampling, resume, and the errors a
user can cause (each named before the model loads, or skipped with `data.on_bad_sample=skip`)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import datamodules.video as video_module
from datamodules.demo_videos import render, write_demo_videos
from datamodules.sampling import ResumableShuffle
from datamodules.textfiles import DataError
from datamodules.video import BadSampleWarning, VideoDataModule, frame_indices, resize_crop
from datamodules.video_buckets import VideoBatchSampler, pick_bucket
from datamodules.video_io import count_frames
from finetune.data import ImageSpec, Processor, VideoSpec
from finetune.media import write_video


@pytest.fixture()
def dataset(tmp_path):
    return write_demo_videos(tmp_path / "data", count=3, frames=17, size=48)


def module(root, **kw) -> VideoDataModule:
    """The data module connected as the engine connects it, to a family's processor (32x32, 9 frames)."""
    dm = VideoDataModule(root=str(root), **kw)
    dm.connect(Processor(VideoSpec(buckets=((9, 32, 32),))))
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
    with pytest.raises(DataError, match=rf"{lines[0]}: cannot be decoded.*truncated or corrupt.*Download or copy it "
                                        rf"again.*re-encode it"):
        module(dataset).check()


def test_too_short_video_says_how_many_frames(tmp_path):
    root = tmp_path / "short"
    write_video(root / "v.mp4", np.zeros((5, 32, 32, 3), dtype=np.uint8))
    (root / "prompts.txt").write_text("a clip\n")
    (root / "videos.txt").write_text("v.mp4\n")
    with pytest.raises(DataError, match=r"v.mp4: has 5 frames of 32x32 .*fits none of the model's buckets.*the "
                                        r"smallest takes 9 frames of 32x32"):
        module(root).check()


@pytest.mark.parametrize("kw, message", [
    ({"num_frames": 10}, r"model.num_frames=10 is not 8N\+1.*Use 9 or 17"),
    ({"height": 40}, r"model.height=40 is not a multiple of 16.*Use 32 or 48"),
])
def test_unsupported_sizes_are_the_familys_rule_checked_before_loading(tiny_cogvideox, kw, message):
    from recipes.cogvideox.family import CogVideoX

    settings = {"checkpoint": tiny_cogvideox, "height": 32, "width": 32, "num_frames": 9, **kw}
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


def test_image_to_video_samples_carry_their_first_frame(dataset):
    dm = VideoDataModule(root=str(dataset), batch_size=2)
    dm.connect(Processor(VideoSpec(buckets=((9, 32, 32),), conditioning_image=True)))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 32, 32)
    assert (batch["image"] == batch["video"][:, 0]).all()


# -- layouts, buckets, conditioning images, bad inputs -----------------------------------------------

BUCKETS = ((9, 32, 32), (9, 32, 48), (17, 48, 32))


def clip(path, frames=9, height=32, width=32, seed=0, faststart=False):
    """A small mp4 of noise (PyAV, H.264). `faststart` puts the header (frame count included) first, so a file
    cut short still promises all its frames."""
    video = np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    if not faststart:
        return write_video(path, video)
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for image in video:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return path


def image(path, colour, size=(40, 40)):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def cogvideo_folder(root, sizes, images=None):
    """prompts.txt / videos.txt (and images.txt) over clips of the given (frames, height, width)."""
    for i, (f, h, w) in enumerate(sizes):
        clip(root / "videos" / f"{i}.mp4", f, h, w, seed=i)
    (root / "prompts.txt").write_text("".join(f"clip {i}\n" for i in range(len(sizes))))
    (root / "videos.txt").write_text("".join(f"videos/{i}.mp4\n" for i in range(len(sizes))))
    if images is not None:
        (root / "images.txt").write_text("".join(f"{name}\n" for name in images))
    return root


def connected(root, buckets=BUCKETS, conditioning_image=False, **kw) -> VideoDataModule:
    dm = VideoDataModule(root=str(root), **kw)
    dm.connect(Processor(VideoSpec(buckets=tuple(buckets), conditioning_image=conditioning_image)))
    return dm


def test_largest_bucket_without_upscaling():
    buckets = [(9, 32, 32), (9, 32, 48), (9, 48, 32), (17, 32, 32)]
    assert pick_bucket(17, 40, 64, buckets) == (17, 32, 32)  # 17*32*32 > 9*32*48: frames count too
    assert pick_bucket(9, 40, 64, buckets) == (9, 32, 48)  # 17 frames would need more than the clip has
    assert pick_bucket(9, 64, 40, buckets) == (9, 48, 32)
    assert pick_bucket(9, 33, 33, buckets) == (9, 32, 32)  # 48 would upscale the 33 pixels
    assert pick_bucket(9, 60, 100, [(9, 48, 32), (9, 32, 48)]) == (9, 32, 48)  # a tie: the nearest aspect,
    assert pick_bucket(9, 100, 60, [(9, 32, 48), (9, 48, 32)]) == (9, 48, 32)
    assert pick_bucket(9, 64, 64, [(9, 32, 48), (9, 48, 32)]) == (9, 32, 48)  # then the one listed first
    assert pick_bucket(9, 64, 64, [(9, 48, 32), (9, 32, 48)]) == (9, 48, 32)
    assert pick_bucket(8, 64, 64, buckets) is None and pick_bucket(9, 31, 64, buckets) is None


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_metadata_folder_layout(tmp_path, metadata):
    root = tmp_path / "data"
    sizes = [(9, 32, 48), (17, 48, 32), (9, 40, 40)]
    for i, (f, h, w) in enumerate(sizes):
        clip(root / "videos" / f"{i}.mp4", f, h, w, seed=i)
    if metadata == "jsonl":
        rows = [{"file_name": f"videos/{i}.mp4", "text": f"片段 {i}"} for i in range(3)]
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n")
    else:
        (root / "metadata.csv").write_text("file_name,caption\n" + "".join(f"videos/{i}.mp4,片段 {i}\n"
                                                                            for i in range(3)))
    dm = connected(root, batch_size=2)
    assert [(r["prompt"], r["bucket"]) for r in dm.check()] == [
        ("片段 0", (9, 32, 48)), ("片段 1", (17, 48, 32)), ("片段 2", (9, 32, 32))]
    dm.setup()
    shapes = sorted(tuple(b["video"].shape) for b in dm.train_dataloader())
    assert shapes == [(1, 9, 3, 32, 32), (1, 9, 3, 32, 48), (1, 17, 3, 48, 32)]


def test_hf_datasets_with_custom_columns(tmp_path):
    """save_to_disk with paths relative to the dataset folder, and with embedded video and image bytes
    (datasets.Video / Image features, never decoded by datasets)."""
    import datasets

    saved = tmp_path / "saved"
    ds = datasets.Dataset.from_dict({"clip": ["videos/0.mp4", "videos/1.mp4"], "描述": ["一", "二"]})
    ds.save_to_disk(str(saved))
    for i in range(2):
        clip(saved / "videos" / f"{i}.mp4", seed=i)
    dm = connected(saved, video_column="clip", caption_column="描述")
    assert [r["prompt"] for r in dm.check()] == ["一", "二"]
    with pytest.raises(DataError, match=r"data.video_column='video' is not a column.*\['clip', '描述'\]"):
        connected(saved, caption_column="描述").check()
    with pytest.raises(DataError, match=r"data.root='someone/videos': could not load it from the hub.*save_to_disk"):
        connected("someone/videos").check()  # offline (tests set HF_HUB_OFFLINE)

    embedded = datasets.Dataset.from_dict({"clip": [str(saved / "videos/0.mp4"), str(saved / "videos/1.mp4")],
                                           "prompt": ["a", "b"],
                                           "still": [str(image(tmp_path / "red.png", (255, 0, 0))),
                                                     str(image(tmp_path / "blue.png", (0, 0, 255)))]})
    embedded = embedded.cast_column("clip", datasets.Video()).cast_column("still", datasets.Image())
    embedded.save_to_disk(str(tmp_path / "embedded"))
    dm = connected(tmp_path / "embedded", buckets=[(9, 32, 32)], conditioning_image=True, video_column="clip",
                   image_column="still", batch_size=2)
    dm.setup()
    (batch,) = list(dm.train_dataloader())
    assert batch["video"].shape == (2, 9, 3, 32, 32) and batch["image"].shape == (2, 3, 32, 32)
    colours = {p: img[:, 16, 16].round(decimals=3).tolist() for p, img in zip(batch["prompt"], batch["image"])}
    assert colours == {"a": [1.0, -1.0, -1.0], "b": [-1.0, -1.0, 1.0]}
    assert all(k.startswith("sha256:") for k in batch["key"])  # embedded bytes are keyed by their hash


def test_clips_go_to_their_buckets_and_batches_never_mix(tmp_path):
    sizes = [(9, 32, 32), (9, 40, 60), (17, 64, 40), (9, 32, 32), (9, 36, 50), (17, 50, 50), (9, 33, 33)]
    dm = connected(cogvideo_folder(tmp_path / "data", sizes), batch_size=2, seed=3)
    assert [r["bucket"] for r in dm.check()] == [(9, 32, 32), (9, 32, 48), (17, 48, 32), (9, 32, 32),
                                                 (9, 32, 48), (17, 48, 32), (9, 32, 32)]
    dm.setup()
    batches = list(dm.train_dataloader())
    assert len(batches) == 4  # buckets of 3, 2 and 2 clips in batches of 2
    bucket_of = {r["prompt"]: r["bucket"] for r in dm.check()}
    for batch in batches:  # one bucket per batch, the one its clips were given
        f, _, h, w = batch["video"].shape[1:]
        assert {bucket_of[p] for p in batch["prompt"]} == {(f, h, w)} and len(batch["key"]) <= 2
        assert batch["video"].min() >= -1 and batch["video"].max() <= 1
    assert sorted(p for b in batches for p in b["prompt"]) == [f"clip {i}" for i in range(7)]
    # mid-epoch resume: a fresh loader restored from the state after two batches yields the rest
    loader = dm.train_dataloader()
    it = iter(loader)
    head = [next(it)["key"] for _ in range(2)]
    state = loader.state_dict()
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert head + [b["key"] for b in resumed] == [b["key"] for b in batches]
    # two ranks: the same number of whole, single-bucket batches each, together every clip
    buckets = [r["bucket"] for r in dm.check()]
    ranks = [list(dm.bucket_sampler(num_replicas=2, rank=rank)) for rank in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2
    assert all(len({buckets[i] for i in batch}) == 1 for r in ranks for batch in r)
    assert {i for r in ranks for batch in r for i in batch} == set(range(7))


def test_one_bucket_keeps_the_resumable_shuffle_order():
    """One bucket: batches are ResumableShuffle's order cut in batch_size (the order before buckets, so the
    golden losses of single-size recipes hold), sharded by whole batches."""
    sampler = VideoBatchSampler([(9, 32, 32)] * 7, batch_size=3, seed=42)
    for epoch in range(2):
        order = ResumableShuffle(7, seed=42)
        order.set_epoch(epoch)
        expected = order.order()
        assert list(sampler) == [expected[0:3], expected[3:6], expected[6:7]]
    ranks = [list(VideoBatchSampler([(9, 32, 32)] * 7, 3, seed=42, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2 and {i for r in ranks for b in r for i in b} == set(range(7))


def test_conditioning_images_from_images_txt_and_metadata(tmp_path):
    root = cogvideo_folder(tmp_path / "list", [(9, 32, 32)] * 2, images=["a.png", "b.png"])
    image(root / "a.png", (255, 0, 0), size=(64, 40))
    image(root / "b.png", (0, 255, 0))
    dm = connected(root, buckets=[(9, 32, 32)], conditioning_image=True, batch_size=2)
    dm.setup()
    (batch,) = list(dm.train_dataloader())
    colours = {p: img[:, 5, 5].round(decimals=3).tolist() for p, img in zip(batch["prompt"], batch["image"])}
    assert colours == {"clip 0": [1.0, -1.0, -1.0], "clip 1": [-1.0, 1.0, -1.0]}
    assert batch["image"].shape == (2, 3, 32, 32)
    # the metadata layout: an `image` column, per row; a row without one starts from its first frame
    meta = tmp_path / "meta"
    clip(meta / "0.mp4", seed=1)
    clip(meta / "1.mp4", seed=2)
    image(meta / "first.png", (0, 0, 255))
    (meta / "metadata.jsonl").write_text(json.dumps({"file_name": "0.mp4", "prompt": "x", "image": "first.png"}) +
                                         "\n" + json.dumps({"file_name": "1.mp4", "prompt": "y"}) + "\n")
    dm = connected(meta, buckets=[(9, 32, 32)], conditioning_image=True, batch_size=2)
    dm.setup()
    (batch,) = list(dm.train_dataloader())
    by_prompt = dict(zip(batch["prompt"], range(2)))
    assert batch["image"][by_prompt["x"], :, 5, 5].round(decimals=3).tolist() == [-1.0, -1.0, 1.0]
    assert torch.equal(batch["image"][by_prompt["y"]], batch["video"][by_prompt["y"], 0])


def test_key_covers_file_caption_bucket_and_image(tmp_path):
    root = cogvideo_folder(tmp_path / "data", [(9, 32, 32)], images=["a.png"])
    image(root / "a.png", (255, 0, 0))

    def key(**kw):
        return connected(root, **kw).check()[0]["key"]

    t2v, i2v = key(buckets=[(9, 32, 32)]), key(buckets=[(9, 32, 32)], conditioning_image=True)
    assert "image=" not in t2v and i2v.startswith(t2v) and "a.png" in i2v
    assert key(buckets=[(5, 32, 32)]) != t2v  # another bucket
    (root / "prompts.txt").write_text("another caption\n")
    assert key(buckets=[(9, 32, 32)]) != t2v
    image(root / "a.png", (0, 255, 0), size=(48, 48))
    assert key(buckets=[(9, 32, 32)], conditioning_image=True) != i2v.replace(t2v, key(buckets=[(9, 32, 32)]))
    before = key(buckets=[(9, 32, 32)])
    clip(root / "videos" / "0.mp4", seed=7)  # the file itself changed
    assert key(buckets=[(9, 32, 32)]) != before


def test_truncated_videos_are_caught_before_training(tmp_path):
    root = cogvideo_folder(tmp_path / "data", [(17, 32, 32)])
    path = clip(root / "videos" / "0.mp4", frames=17, faststart=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the header still promises 17 frames
    with pytest.raises(DataError, match=r"0.mp4: .*but the run samples frames up to 16 \(its header says 17 "
                                        r"frames\): the file is truncated or corrupt.*Download or copy it again.*"
                                        r"re-encode it"):
        connected(root, buckets=[(17, 32, 32)]).check()
    clip(path, frames=17)  # header (moov) at the end: cut short, it does not open at all
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"0.mp4: cannot be decoded"):
        connected(root, buckets=[(17, 32, 32)]).check()


def test_missing_or_undecodable_conditioning_image_is_named(tmp_path):
    root = cogvideo_folder(tmp_path / "data", [(9, 32, 32)] * 2, images=["a.png", "missing.png"])
    image(root / "a.png", (255, 0, 0))
    with pytest.raises(DataError, match=r"images.txt, line 2: conditioning image .*missing.png does not exist"):
        connected(root, conditioning_image=True).check()
    connected(root).check()  # text-to-video never reads images.txt
    (root / "missing.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"missing.png: conditioning image cannot be decoded.*Re-save"):
        connected(root, conditioning_image=True).check()
    (root / "images.txt").write_text("a.png\n")
    with pytest.raises(DataError, match=r"images.txt has 1 images but .*videos.txt has 2 videos"):
        connected(root, conditioning_image=True).check()


def test_empty_lists_and_datasets_are_errors(tmp_path):
    import datasets

    root = tmp_path / "list"
    root.mkdir()
    (root / "prompts.txt").write_text("")
    (root / "videos.txt").write_text("\n")
    with pytest.raises(DataError, match=r"prompts.txt and .*videos.txt are empty"):
        connected(root).check()
    meta = tmp_path / "meta"
    meta.mkdir()
    (meta / "metadata.jsonl").write_text("\n")
    with pytest.raises(DataError, match=r"metadata file lists no videos"):
        connected(meta).check()
    rows = datasets.Dataset.from_dict({"video": ["0.mp4"], "prompt": ["a caption"]})
    rows.filter(lambda row: False).save_to_disk(str(tmp_path / "saved"))  # (datasets cannot save an empty dict)
    with pytest.raises(DataError, match=r"saved.*has no rows"):
        connected(tmp_path / "saved").check()


def test_clip_too_small_for_every_bucket_names_its_size(tmp_path):
    root = cogvideo_folder(tmp_path / "data", [(17, 16, 24)])
    with pytest.raises(DataError, match=r"0.mp4: has 17 frames of 16x24 \(height x width\) and fits none of the "
                                        r"model's buckets without upscaling; the smallest takes 9 frames of 32x32"):
        connected(root).check()


def test_bad_sample_policy(tmp_path):
    root = cogvideo_folder(tmp_path / "data", [(9, 32, 32), (9, 16, 16), (17, 32, 32), (9, 32, 32)])
    (root / "videos" / "0.mp4").unlink()
    cut = clip(root / "videos" / "2.mp4", frames=17, faststart=True)
    cut.write_bytes(cut.read_bytes()[:1500])
    # fail: the run stops once every clip is checked, naming the bad ones in data order, and the way to skip them
    with pytest.raises(DataError, match=r"(?s)3 bad clip\(s\) of 4:\n  \S*videos.txt, line 1: video .*0.mp4 does not "
                                        r"exist.*\n  .*1.mp4: has 9 frames of 16x16.*\n  .*2.mp4: .*truncated.*"
                                        r"\nOr set data.on_bad_sample=skip to train without them\.$"):
        connected(root, buckets=[(9, 32, 32)]).check()
    dm = connected(root, buckets=[(9, 32, 32)], on_bad_sample="skip", check_workers=2)
    with pytest.warns(BadSampleWarning) as caught:
        records = dm.check()
    messages = [str(w.message) for w in caught]
    assert len(messages) == 4 and "left out 3 of 4 clips" in messages[-1]
    assert "0.mp4 does not exist" in messages[0] and "1.mp4: has 9 frames of 16x16" in messages[1]
    assert "2.mp4" in messages[2] and "truncated" in messages[2]
    assert [r["prompt"] for r in records] == ["clip 3"]
    dm.setup()
    assert [b["prompt"] for b in dm.train_dataloader()] == [["clip 3"]]
    (root / "videos.txt").write_text("videos/0.mp4\n")
    (root / "prompts.txt").write_text("clip 0\n")
    with pytest.warns(BadSampleWarning), pytest.raises(DataError, match=r"none of its 1 clips is usable"):
        connected(root, on_bad_sample="skip").check()
    with pytest.raises(DataError, match=r"data.on_bad_sample='ignore': use `fail`.*or `skip`"):
        connected(root, on_bad_sample="ignore").check()


def bad_clips_folder(root):
    """Six clips, five of them bad in a different way each, and a good one last."""
    root = cogvideo_folder(root, [(9, 32, 32)] * 6)
    videos = root / "videos"
    (videos / "0.mp4").write_bytes(b"")  # a copy that never got its data
    cut = clip(videos / "1.mp4", frames=9, faststart=True)
    cut.write_bytes(cut.read_bytes()[:1500])  # header present, frames missing
    good = (videos / "5.mp4").read_bytes()
    assert good.count(b"avc1") >= 1
    (videos / "2.mp4").write_bytes(good.replace(b"avc1", b"zzzz"))  # a codec tag no FFmpeg decodes
    clip(videos / "3.mp4", frames=5)  # too short for the 9-frame bucket
    (videos / "4.mp4").write_bytes(b"a text file renamed .mp4\n" * 20)
    return root


def test_fail_lists_every_bad_clip_with_the_fix_for_its_kind(tmp_path):
    root = bad_clips_folder(tmp_path / "data")
    with pytest.raises(DataError) as caught:
        connected(root, buckets=[(9, 32, 32)], check_workers=2).check()
    head, *problems, tail = str(caught.value).splitlines()
    assert head == "5 bad clip(s) of 6:" and tail == "Or set data.on_bad_sample=skip to train without them."
    assert [p.split(": ", 1)[0].rsplit("/", 1)[-1] for p in problems] == ["0.mp4", "1.mp4", "2.mp4", "3.mp4", "4.mp4"]
    empty, truncated, codec, short, renamed = problems
    assert "is empty (0 bytes)" in empty and "Copy or download it again" in empty
    assert "ffmpeg" not in empty and "encode" not in empty.replace("not badly encoded", "")  # missing data: no re-encode
    assert re.search(r"decoding failed after \d+ frames.*truncated or corrupt\. Download or copy it again; .*"
                     r"re-encode it", truncated)
    assert re.search(r"the file opens, but its video codec `zzzz` .*has no decoder in the installed PyAV .*Convert it "
                     r"to H\.264 .*`ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT\.mp4`", codec)
    assert "truncated" not in codec
    assert "has 5 frames of 32x32" in short and "fits none of the model's buckets" in short
    assert "cannot be decoded (InvalidDataError" in renamed and "truncated or corrupt" in renamed


def test_skip_leaves_out_every_kind_of_bad_clip(tmp_path):
    dm = connected(bad_clips_folder(tmp_path / "data"), buckets=[(9, 32, 32)], on_bad_sample="skip")
    with pytest.warns(BadSampleWarning) as caught:
        records = dm.check()
    messages = [str(w.message) for w in caught if w.category is BadSampleWarning]
    assert len(messages) == 6 and "left out 5 of 6 clips" in messages[-1]
    assert [r["prompt"] for r in records] == ["clip 5"]


def test_a_fail_shows_the_first_twenty_bad_clips_and_counts_the_rest(tmp_path):
    root = cogvideo_folder(tmp_path / "data", [(9, 32, 32)])
    for i in range(1, 24):
        (root / "videos" / f"{i}.mp4").write_bytes(b"")
    (root / "prompts.txt").write_text("".join(f"clip {i}\n" for i in range(24)))
    (root / "videos.txt").write_text("".join(f"videos/{i}.mp4\n" for i in range(24)))
    with pytest.raises(DataError) as caught:
        connected(root, buckets=[(9, 32, 32)]).check()
    lines = str(caught.value).splitlines()
    assert lines[0] == "23 bad clip(s) of 24:" and lines[-2] == "  ... and 3 more"
    shown = [line for line in lines if "is empty (0 bytes)" in line]
    assert [line.split(": ")[0].rsplit("/", 1)[-1] for line in shown] == [f"{i}.mp4" for i in range(1, 21)]


def test_many_clips_are_checked_in_parallel_with_a_progress_bar(dataset, monkeypatch, capsys):
    monkeypatch.setattr(video_module, "PROGRESS_FROM", 2)
    assert len(module(dataset, check_workers=3).check()) == 3
    assert "checking videos" in capsys.readouterr().err


def test_several_processes_need_the_sampler_to_shard_itself(dataset):
    from types import SimpleNamespace

    dm = module(dataset)
    dm.setup()
    dm.trainer = SimpleNamespace(world_size=2, _accelerator_connector=SimpleNamespace(use_distributed_sampler=True))
    with pytest.raises(DataError, match=r"trainer.use_distributed_sampler=false"):
        dm.train_dataloader()
    dm.trainer._accelerator_connector.use_distributed_sampler = False
    assert dm.train_dataloader() is not None


def test_video_recipes_leave_sharding_to_the_batch_sampler():
    """The recipe side sets trainer.use_distributed_sampler: false wherever the data is VideoDataModule."""
    from conftest import REPO, compose

    for path in sorted((REPO / "conf" / "recipe").glob("*.yaml")):
        cfg = compose([f"recipe={path.stem}"])
        if cfg.data._target_ == "datamodules.video.VideoDataModule":
            assert cfg.trainer.get("use_distributed_sampler") is False, path.name


def test_an_unchanged_clip_is_decoded_once_across_checks(dataset, monkeypatch):
    """A second check (the next run) takes what the first found out about each unchanged clip instead of decoding
    it again; a changed file, or recheck_files=true, is decoded again."""
    decoded = []
    real = video_module.check_frames
    monkeypatch.setattr(video_module, "check_frames", lambda source, indices: (decoded.append(source),
                                                                                 real(source, indices))[1])
    first = module(dataset).check()
    assert len(decoded) == 3
    again = module(dataset).check()
    assert len(decoded) == 3 and [r["key"] for r in again] == [r["key"] for r in first]
    changed = dataset / "videos" / sorted((dataset / "videos").iterdir())[0].name
    write_video(changed, np.zeros((17, 48, 48, 3), np.uint8), fps=8)
    module(dataset).check()
    assert decoded[3:] == [str(changed)]
    module(dataset, recheck_files=True).check()
    assert len(decoded) == 7
