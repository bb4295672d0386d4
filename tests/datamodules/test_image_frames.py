"""Images in video training (datamodules/video_images.py): one-frame samples in (1, H, W) buckets, never batched
with clips, from `data.image_root` or a mixed metadata.jsonl; `data.image_ratio`; their cache keys; the refusal
for families that take no one-frame samples."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from datamodules.textfiles import DataError
from datamodules.video import VideoDataModule
from datamodules.video_buckets import VideoBatchSampler
from finetune.data import Processor, VideoSpec
from finetune.media import write_video

BUCKETS = ((9, 32, 32), (9, 32, 48))


def clip(path, frames=9, height=32, width=32, seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, rng.integers(0, 255, (frames, height, width, 3), dtype=np.uint8), fps=8)


def picture(path, colour, size=(32, 32)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), colour).save(path)


def mixed_folder(root):
    """metadata.jsonl naming two clips and three images (one wide)."""
    clip(root / "a.mp4", seed=1)
    clip(root / "b.mp4", height=40, width=60, seed=2)
    picture(root / "red.png", (255, 0, 0))
    picture(root / "green.jpg", (0, 255, 0), size=(36, 36))
    picture(root / "wide.png", (0, 0, 255), size=(40, 64))
    rows = [("a.mp4", "clip a"), ("red.png", "a red square"), ("b.mp4", "clip b"), ("green.jpg", "green"),
            ("wide.png", "a wide blue")]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "prompt": p}) + "\n" for f, p in rows))
    return root


def connected(root, one_frame=True, conditioning_image=False, **kw) -> VideoDataModule:
    dm = VideoDataModule(root=str(root), **kw)
    dm.connect(Processor(VideoSpec(buckets=BUCKETS, conditioning_image=conditioning_image, one_frame=one_frame)))
    return dm


def test_images_are_one_frame_samples_in_their_own_buckets(tmp_path):
    dm = connected(mixed_folder(tmp_path / "data"), batch_size=2, seed=1)
    records = {r["prompt"]: r for r in dm.check()}
    assert {p: (r["kind"], r["bucket"]) for p, r in records.items()} == {
        "clip a": ("video", (9, 32, 32)), "clip b": ("video", (9, 32, 48)), "a red square": ("image", (1, 32, 32)),
        "green": ("image", (1, 32, 32)), "a wide blue": ("image", (1, 32, 48))}
    dm.setup()
    batches = list(dm.train_dataloader())
    seen = Counter()
    for batch in batches:  # a batch is all images (one frame) or all clips, of one bucket
        kinds = {records[p]["kind"] for p in batch["prompt"]}
        f, _, h, w = batch["video"].shape[1:]
        assert len(kinds) == 1 and {records[p]["bucket"] for p in batch["prompt"]} == {(f, h, w)}
        assert (f == 1) == (kinds == {"image"})
        seen.update(batch["prompt"])
    assert seen == Counter(list(records))  # each sample once per epoch
    by_prompt = {p: v for b in batches for p, v in zip(b["prompt"], b["video"])}
    assert by_prompt["a red square"][0, :, 5, 5].tolist() == [1.0, -1.0, -1.0]  # the image itself, in [-1, 1]
    # keys: an image's names its file, its one-frame bucket and the image preprocessing (never a clip's)
    image_key, clip_key = records["a red square"]["key"], records["clip a"]["key"]
    assert "|1x32x32|" in image_key and image_key.split("|prep=")[1] != clip_key.split("|prep=")[1]
    picture(tmp_path / "data" / "red.png", (250, 0, 0))  # the file changed: its key does
    assert connected(tmp_path / "data").check()[1]["key"] != image_key


def test_image_root_adds_a_folder_of_images(tmp_path):
    videos = tmp_path / "videos"
    clip(videos / "v.mp4")
    (videos / "prompts.txt").write_text("a clip\n")
    (videos / "videos.txt").write_text("v.mp4\n")
    dm = connected(videos, image_root="demo", demo_count=3)
    kinds = [(r["kind"], r["bucket"][0]) for r in dm.check()]
    assert kinds == [("video", 9)] + [("image", 1)] * 3
    with pytest.raises(DataError, match=r"data.image_root='.*nowhere' is not a folder with metadata"):
        connected(videos, image_root=str(tmp_path / "nowhere")).check()


def test_image_ratio_sets_the_share_of_image_steps():
    buckets = [(9, 32, 32)] * 6 + [(1, 32, 32)] * 2  # six clips, two images
    is_image = [False] * 6 + [True] * 2
    sampler = VideoBatchSampler(buckets, 1, seed=0, is_image=is_image, image_ratio=0.5)
    for epoch in range(2):
        batches = sampler.epoch_batches(epoch)
        images = [b[0] for b in batches if is_image[b[0]]]
        assert len(batches) == 12 and len(images) == 6  # six clip steps, six image steps
        assert Counter(images) == {6: 3, 7: 3}  # the images cycle evenly
        assert sorted(b[0] for b in batches if not is_image[b[0]]) == list(range(6))
    assert sampler.epoch_batches(0) != sampler.epoch_batches(1)
    few = VideoBatchSampler(buckets, 1, seed=0, is_image=is_image, image_ratio=0.1)
    assert sum(is_image[b[0]] for b in few.epoch_batches(0)) == 1  # round(6 * 0.1 / 0.9) = 1
    ranks = [VideoBatchSampler(buckets, 1, seed=0, is_image=is_image, image_ratio=0.5, num_replicas=5, rank=r)
             for r in range(5)]
    assert len({len(r) for r in ranks}) == 1  # 12 steps padded to 15: the same count on every rank
    for bad, message in ((1.0, "strictly between 0 and 1"), (0.0, "strictly between 0 and 1")):
        with pytest.raises(DataError, match=message):
            VideoBatchSampler(buckets, 1, is_image=is_image, image_ratio=bad)
    with pytest.raises(DataError, match="the data has no images"):
        VideoBatchSampler(buckets[:6], 1, is_image=is_image[:6], image_ratio=0.3)


def test_image_ratio_is_checked_before_decoding(tmp_path):
    root = tmp_path / "videos"
    clip(root / "v.mp4")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "v.mp4", "prompt": "p"}) + "\n")
    with pytest.raises(DataError, match=r"data.image_ratio=0.3 .* the data has no images"):
        connected(root, image_ratio=0.3).check()


def test_families_without_one_frame_samples_refuse_images(tmp_path):
    root = mixed_folder(tmp_path / "data")
    with pytest.raises(DataError, match=r"3 of the samples are images .*red.png, but an image-to-video sample is the "
                                        r"motion .*text-to-video recipe"):
        connected(root, one_frame=False, conditioning_image=True).check()


def test_a_broken_or_small_image_is_named(tmp_path):
    root = tmp_path / "data"
    picture(root / "ok.png", (1, 2, 3))
    picture(root / "small.png", (1, 2, 3), size=(16, 40))
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [("ok.png", "ok"), ("small.png", "small"), ("broken.png", "broken")]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": f, "prompt": p}) + "\n" for f, p in rows))
    with pytest.raises(DataError) as err:
        connected(root).check()
    text = str(err.value)
    assert "small.png: is 16x40 (height x width) and fits none of the one-frame buckets" in text
    assert "broken.png: image cannot be decoded" in text
