"""Image-caption data: sources (image folder, save_to_disk, parquet, demo), errors named before training,
aspect buckets within CogView4's limits, batches that never mix buckets, and exact mid-epoch resume."""

from __future__ import annotations

import json
import random

import datasets
import pytest
import torch
from PIL import Image

from datamodules.buckets import BucketBatchSampler, make_buckets, nearest_bucket
from datamodules.images import ImageDataModule
from datamodules.textfiles import DataError
from finetune.data import ImageSpec, Processor

TINY = ImageSpec(pixels=4096, min_side=32, max_side=64, multiple=32, max_pixels=4096)


def image_data(root: str, spec: ImageSpec = TINY, **kw) -> ImageDataModule:
    """The data module connected as the engine connects it, to a family's processor (tiny buckets)."""
    data = ImageDataModule(root=root, **kw)
    data.connect(Processor(spec))
    return data


def write_folder(root, sizes=((40, 80), (80, 40), (60, 60)), captions=None, metadata="jsonl"):
    root.mkdir(parents=True, exist_ok=True)
    captions = captions or [f"caption {i} 图片" for i in range(len(sizes))]
    rows = []
    for i, ((h, w), caption) in enumerate(zip(sizes, captions)):
        Image.new("RGB", (w, h), (10 * i, 100, 200)).save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "prompt": caption})
    if metadata == "jsonl":
        (root / "metadata.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                                             encoding="utf-8")
    else:
        lines = ["file_name,prompt"] + [f"{r['file_name']},{r['prompt']}" for r in rows]
        (root / "metadata.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def cogview4_buckets(**change) -> list[tuple[int, int]]:
    from recipes.cogview.cogview4 import CogView4

    spec = CogView4.data_processor(**change).spec  # the family's limits, no weights loaded
    return make_buckets(spec.pixels, spec.min_side, spec.max_side, spec.multiple, spec.max_pixels)


def test_buckets_respect_cogview4_limits():
    buckets = cogview4_buckets()
    assert (1024, 1024) in buckets and (512, 2048) in buckets and (2048, 512) in buckets
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0 and 512 <= min(h, w) and max(h, w) <= 2048 and h * w <= 2**21
        assert h * w > 0.9 * 1024 * 1024  # all about the target area
    assert make_buckets(4096, min_side=32, max_side=64, multiple=32, max_pixels=2**21) == [(32, 64), (64, 64), (64, 32)]
    with pytest.raises(DataError, match="model.bucket_pixels=4194304 must lie between.*model.max_pixels=2097152"):
        cogview4_buckets(bucket_pixels=2048 * 2048)
    assert nearest_bucket(720, 1280, buckets) == min(buckets, key=lambda b: abs(b[0] / b[1] - 720 / 1280))
    assert nearest_bucket(1000, 1000, buckets) == (1024, 1024)
    assert nearest_bucket(100, 1000, buckets) == (512, 2048)  # beyond the extreme ratio: the extreme bucket


def test_batches_never_mix_buckets_and_cover_every_sample_once():
    rng = random.Random(0)
    shapes = [(32, 64), (64, 64), (64, 32)]
    buckets = [rng.choice(shapes) for _ in range(37)]
    sampler = BucketBatchSampler(buckets, batch_size=4, seed=3)
    epochs = [list(sampler) for _ in range(2)]
    for batches in epochs:
        assert all(len({buckets[i] for i in batch}) == 1 for batch in batches)
        assert sorted(i for batch in batches for i in batch) == list(range(37))
        assert len(batches) == len(sampler)
    assert epochs[0] != epochs[1]  # reshuffled each epoch
    assert list(BucketBatchSampler(buckets, batch_size=4, seed=3)) == epochs[0]  # a function of (seed, epoch)
    # Two ranks: the same number of batches each, disjoint, together everything.
    ranks = [list(BucketBatchSampler(buckets, batch_size=4, seed=3, num_replicas=2, rank=r)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1])
    assert {i for r in ranks for b in r for i in b} == set(range(37))


def test_sampler_resumes_mid_epoch_and_across_epochs():
    buckets = [(32, 64)] * 5 + [(64, 64)] * 7
    reference = BucketBatchSampler(buckets, batch_size=2, seed=1)
    uninterrupted = list(reference) + list(reference)
    first = BucketBatchSampler(buckets, batch_size=2, seed=1)
    it = iter(first)
    seen = [next(it) for _ in range(4)]
    state = first.state_dict()
    resumed = BucketBatchSampler(buckets, batch_size=2, seed=1)
    resumed.load_state_dict(state)
    assert seen + list(resumed) + list(resumed) == uninterrupted


def test_demo_batches_through_the_stateful_loader_resume_exactly(cache_dir):
    data = image_data("demo", batch_size=2, seed=5, demo_count=12)
    data.setup()
    batches = list(data.train_dataloader())
    assert len(batches) == 6
    prompts = [p for b in batches for p in b["prompt"]]
    assert any(any("\u4e00" <= c <= "\u9fff" for c in p) for p in prompts)  # Chinese captions
    assert any(p.startswith("a ") for p in prompts)  # and English ones
    shapes = set()
    for b in batches:
        assert b["image"].dtype == torch.float32 and -1.0 <= b["image"].min() and b["image"].max() <= 1.0
        shapes.add(tuple(b["image"].shape[2:]))
    assert shapes == {(64, 64), (32, 64), (64, 32)}
    # Stop after two batches, save the loader state, restore it into a fresh loader: same remaining batches.
    loader = data.train_dataloader()
    it = iter(loader)
    head = [next(it)["key"] for _ in range(2)]
    state = loader.state_dict()
    fresh = image_data("demo", batch_size=2, seed=5, demo_count=12)
    fresh.setup()
    resumed = fresh.train_dataloader()
    resumed.load_state_dict(state)
    assert head + [b["key"] for b in resumed] == [b["key"] for b in batches]


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_image_folder_layouts(tmp_path, metadata):
    root = write_folder(tmp_path / "data", metadata=metadata)
    data = image_data(str(root), batch_size=1)
    table = data.check()
    assert table["prompt"] == ["caption 0 图片", "caption 1 图片", "caption 2 图片"]
    assert table["bucket"] == [(32, 64), (64, 32), (64, 64)]
    data.setup()
    assert {tuple(b["image"].shape) for b in data.train_dataloader()} == {(1, 3, 32, 64), (1, 3, 64, 32), (1, 3, 64, 64)}


def test_hf_datasets_saved_to_disk_and_parquet_with_custom_columns(tmp_path):
    folder = write_folder(tmp_path / "imgs")
    paths = [str(folder / f"{i}.png") for i in range(3)]
    ds = datasets.Dataset.from_dict({"picture": paths, "描述": ["一", "二", "三"], "other": [1, 2, 3]})
    ds = ds.cast_column("picture", datasets.Image())
    ds.save_to_disk(str(tmp_path / "saved"))
    ds.to_parquet(str(tmp_path / "data.parquet"))  # embeds the image bytes
    for root in (tmp_path / "saved", tmp_path / "data.parquet"):
        data = image_data(str(root), image_column="picture", caption_column="描述", batch_size=2)
        assert data.check()["prompt"] == ["一", "二", "三"]
        data.setup()
        batches = list(data.train_dataloader())
        assert sorted(p for b in batches for p in b["prompt"]) == ["一", "三", "二"]
    with pytest.raises(DataError, match=r"caption_column='caption'.*\['picture', '描述', 'other'\]"):
        image_data(str(tmp_path / "saved"), image_column="picture", caption_column="caption").check()


def test_undecodable_caption_file_names_the_line(tmp_path):
    root = write_folder(tmp_path / "data")
    good = (root / "metadata.jsonl").read_bytes().splitlines()
    bad = '{"file_name": "1.png", "text": "中文标题"}'.encode("gbk")
    (root / "metadata.jsonl").write_bytes(b"\n".join([good[0], bad, good[2]]) + b"\n")
    with pytest.raises(DataError, match=r"metadata.jsonl, line 2: not valid UTF-8.*iconv"):
        image_data(str(root)).check()


@pytest.mark.parametrize("problem, message", [
    ("missing", r"2\.png does not exist"), ("corrupt", r"2\.png: not a readable image"),
    ("empty caption", r"metadata.jsonl, line 3: empty or missing caption"),
    ("no caption column", r"line 1: needs `file_name` and one of"),
])
def test_bad_entries_are_reported_by_name_before_training(tmp_path, problem, message):
    root = write_folder(tmp_path / "data")
    lines = (root / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    if problem == "missing":
        (root / "2.png").unlink()
    elif problem == "corrupt":
        (root / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    elif problem == "empty caption":
        lines[2] = json.dumps({"file_name": "2.png", "prompt": "  "})
    else:
        lines[0] = json.dumps({"file_name": "0.png", "label": "x"})
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=message):
        image_data(str(root)).check()


def test_keys_change_with_the_file_the_caption_and_the_bucket(tmp_path):
    root = write_folder(tmp_path / "data")
    keys = image_data(str(root)).check()["key"]
    assert len(set(keys)) == 3
    metadata = root / "metadata.jsonl"
    metadata.write_text(metadata.read_text(encoding="utf-8").replace("caption 1", "changed"), encoding="utf-8")
    Image.new("RGB", (80, 40), (1, 2, 3)).save(root / "0.png")  # same size, new pixels (and mtime)
    changed = image_data(str(root)).check()["key"]
    assert changed[0] != keys[0] and changed[1] != keys[1] and changed[2] == keys[2]
    rebucketed = image_data(str(root), ImageSpec(pixels=2048, min_side=32, max_side=64, multiple=32, max_pixels=4096))
    assert rebucketed.check()["key"][2] != changed[2]  # 60x60 goes to another bucket: another latent size


def test_missing_root_says_what_to_do(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        image_data(str(tmp_path / "nowhere")).check()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="metadata.jsonl.*data.root=demo"):
        image_data(str(tmp_path / "empty")).check()


def test_sampler_reads_rank_and_world_size_from_torch_distributed(monkeypatch):
    buckets = [(32, 64)] * 6 + [(64, 64)] * 7
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 3)
    shards = []
    for rank in range(3):
        monkeypatch.setattr(dist, "get_rank", lambda *a, r=rank: r)
        shards.append(list(BucketBatchSampler(buckets, batch_size=2, seed=0)))
    assert [len(s) for s in shards] == [3, 3, 3]  # 7 batches, padded by repeating to 9: every rank runs 3 steps
    assert {i for s in shards for b in s for i in b} == set(range(13))
    assert all(len({buckets[i] for i in b}) == 1 for s in shards for b in s)


# -- every image decoded in full before training; bad ones fail or are skipped ----------------------------------

def cut_jpeg(path) -> None:
    """A JPEG whose header is intact but whose body stops half-way (an interrupted download or copy)."""
    Image.effect_noise((64, 64), 80).convert("RGB").save(path, format="JPEG", quality=95)
    body = path.read_bytes()
    path.write_bytes(body[: len(body) // 2])


def test_a_cut_off_image_is_found_before_training(tmp_path):
    root = write_folder(tmp_path / "data")
    cut_jpeg(root / "1.png")
    with Image.open(root / "1.png") as image:
        image.verify()  # a header check passes: without decoding it all, it would crash mid-epoch
    with pytest.raises(DataError, match=r"(?s)1 bad image\(s\) of 3:\n  .*1\.png: not a readable image \(OSError: "
                                        r"image file is truncated.*Or set data.on_bad_sample=skip"):
        image_data(str(root)).check()


def test_an_image_smaller_than_the_smallest_bucket_is_named(tmp_path):
    root = write_folder(tmp_path / "data", sizes=((40, 80), (1, 1), (60, 60)))
    with pytest.raises(DataError, match=r"1\.png: 1x1 pixels \(HxW\) is smaller than the smallest bucket 32x64 \(no "
                                        r"bucket side is under 32\); it would be upscaled 32\.0x"):
        image_data(str(root)).check()


def test_skip_leaves_bad_images_out_with_a_warning_each_and_a_count(tmp_path):
    root = write_folder(tmp_path / "data", sizes=((40, 80), (80, 40), (60, 60), (1, 1)))
    cut_jpeg(root / "1.png")
    with pytest.warns(UserWarning) as warned:
        table = image_data(str(root), on_bad_sample="skip").check()
    assert table["prompt"] == ["caption 0 图片", "caption 2 图片"] and table["bucket"] == [(32, 64), (64, 64)]
    messages = [str(w.message) for w in warned]
    assert sum("skipped (data.on_bad_sample=skip)" in m for m in messages) == 2
    assert any("1.png: not a readable image" in m for m in messages) and any("3.png: 1x1" in m for m in messages)
    assert any("left out 2 of 4 images" in m for m in messages)


def test_skip_keeps_the_matching_rows_of_an_embedded_dataset(tmp_path):
    folder = write_folder(tmp_path / "imgs", sizes=((40, 80), (1, 1), (60, 60)))
    ds = datasets.Dataset.from_dict({"image": [str(folder / f"{i}.png") for i in range(3)], "text": ["a", "b", "c"]})
    ds.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "data.parquet"))  # embeds the bytes
    with pytest.warns(UserWarning, match="row 1"):
        data = image_data(str(tmp_path / "data.parquet"), on_bad_sample="skip", batch_size=1)
        data.setup()
    batches = list(data.train_dataloader())
    assert sorted(p for b in batches for p in b["prompt"]) == ["a", "c"]
    assert {tuple(b["image"].shape[2:]) for b in batches} == {(32, 64), (64, 64)}  # each image with its own bucket


def test_empty_data_is_an_error(tmp_path):
    root = write_folder(tmp_path / "data")
    (root / "metadata.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="holds no images"):
        image_data(str(root)).check()
    write_folder(root, sizes=((1, 1),))
    with pytest.warns(UserWarning), pytest.raises(DataError, match=r"all 1 images were left out as bad"):
        image_data(str(root), on_bad_sample="skip").check()


def test_an_unchanged_image_is_decoded_once_across_checks(tmp_path, monkeypatch):
    """The next run's check takes each unchanged image's size from the first check instead of decoding it again;
    a changed file, or recheck_files=true, is decoded again."""
    import datamodules.images as images_module

    root = write_folder(tmp_path / "data")
    decoded = []
    real = images_module.image_size
    monkeypatch.setattr(images_module, "image_size", lambda source, where: (decoded.append(source),
                                                                              real(source, where))[1])
    first = image_data(str(root)).check()
    assert len(decoded) == 3
    assert image_data(str(root)).check()["key"] == first["key"] and len(decoded) == 3
    path = sorted(root.glob("*.png"))[0]
    Image.new("RGB", (80, 80)).save(path)
    changed = image_data(str(root)).check()
    assert len(decoded) == 4 and changed["key"] != first["key"]
    image_data(str(root), recheck_files=True).check()
    assert len(decoded) == 7
