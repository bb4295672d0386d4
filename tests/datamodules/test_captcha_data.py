"""Captcha data: the official 80/5/15 split, bad images named, HF dataset columns, generated captchas, batches."""

from __future__ import annotations

import random

import datasets
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from datamodules.captcha import CaptchaDataModule
from datamodules.captcha_sources import CaptchaGenerator, split_indices
from datamodules.textfiles import DataError
from recipes.cogvlm import IGNORE_INDEX

LABELS = [f"{a}{b}x{c}" for a in "ab" for b in "0123" for c in "XYZ"]  # 24 distinct labels


def _captcha(label: str) -> Image.Image:
    image = Image.new("RGB", (80, 30), (250, 250, 250))
    ImageDraw.Draw(image).text((4, 8), label, fill=(20, 20, 120))
    return image


@pytest.fixture
def folder(tmp_path):
    for i, label in enumerate(LABELS):
        _captcha(label).save(tmp_path / f"{label}.{'png' if i % 2 else 'jpg'}")
    (tmp_path / "notes.txt").write_text("not a captcha")
    return tmp_path


def test_split_is_the_official_80_5_15_seed_2023_and_reproducible():
    parts = split_indices(10_000)
    assert [len(parts[s]) for s in ("train", "val", "test")] == [8000, 500, 1500]
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == list(range(10_000))
    assert parts == split_indices(10_000)
    assert parts["val"] != split_indices(10_000, seed=2024)["val"]
    # the official procedure: random.seed(2023); shuffle(names); slice 80 / 5 / 15 percent
    names = list(range(10_000))
    random.seed(2023)
    random.shuffle(names)
    assert parts["val"] == names[8000:8500] and parts["test"] == names[8500:]
    odd = split_indices(23)  # the rounding remainder goes to train, nothing is dropped
    assert [len(odd[s]) for s in ("train", "val", "test")] == [19, 1, 3]  # 18 + 1 left over, 1, 3


def test_folder_split_is_disjoint_reproducible_and_labelled_by_stem(folder):
    splits = CaptchaDataModule(root=str(folder)).check()
    keys = {s: list(ds["key"]) for s, ds in splits.items()}
    assert {s: len(k) for s, k in keys.items()} == {"train": 20, "val": 1, "test": 3}
    assert sorted(sum(keys.values(), [])) == sorted(p.name for p in folder.glob("*.*g"))
    assert keys == {s: list(ds["key"]) for s, ds in CaptchaDataModule(root=str(folder)).check().items()}
    assert all(name.rsplit(".", 1)[0] == label for name, label in zip(splits["train"]["key"], splits["train"]["label"]))


def test_bad_image_is_named_before_the_model_loads(folder):
    (folder / "zz9x.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"(?s)1 bad image\(s\) of 25.*zz9x\.png: not a readable image.*on_bad_sample=skip"):
        CaptchaDataModule(root=str(folder)).check()
    with pytest.raises(DataError, match="is not a directory"):
        CaptchaDataModule(root=str(folder / "missing")).check()


def _hf_dataset(labels):
    return datasets.Dataset.from_dict({"picture": [_captcha(label) for label in labels], "text": labels,
                                       "extra": list(range(len(labels)))}).cast_column("picture", datasets.Image())


def test_hf_dataset_columns_and_own_splits(tmp_path):
    path = tmp_path / "captchas"
    datasets.DatasetDict({"train": _hf_dataset(LABELS[:6]), "validation": _hf_dataset(LABELS[6:8]),
                          "test": _hf_dataset(LABELS[8:11])}).save_to_disk(str(path))
    data = CaptchaDataModule(hf_dataset=str(path), image_column="picture", text_column="text")
    splits = data.check()
    assert {s: list(ds["label"]) for s, ds in splits.items()} == {
        "train": LABELS[:6], "val": LABELS[6:8], "test": LABELS[8:11]}
    assert isinstance(splits["val"][0]["image"], Image.Image)
    with pytest.raises(DataError, match=r"no column 'solution'.*'picture', 'text', 'extra'"):
        CaptchaDataModule(hf_dataset=str(path), image_column="picture").check()


def test_hf_dataset_with_one_split_is_cut_80_5_15(tmp_path):
    path = tmp_path / "single"
    _hf_dataset(LABELS[:20]).save_to_disk(str(path))
    splits = CaptchaDataModule(hf_dataset=str(path), image_column="picture", text_column="text").check()
    assert {s: len(ds) for s, ds in splits.items()} == {"train": 16, "val": 1, "test": 3}
    assert sorted(sum((list(ds["label"]) for ds in splits.values()), [])) == sorted(LABELS[:20])


def test_generated_captchas_are_deterministic():
    a, b = CaptchaGenerator(count=10, length=5, charset="ab12", seed=7), CaptchaGenerator(count=10, length=5, charset="ab12", seed=7)
    for index in (0, 3):
        assert a.label(index) == b.label(index) and set(a.label(index)) <= set("ab12") and len(a.label(index)) == 5
        np.testing.assert_array_equal(np.asarray(a.image(index)), np.asarray(b.image(index)))
    assert a.image(0).size == (160, 60)
    other = CaptchaGenerator(count=10, length=5, charset="ab12", seed=8)
    assert [a.label(i) for i in range(10)] != [other.label(i) for i in range(10)]
    assert not np.array_equal(np.asarray(a.image(1)), np.asarray(a.image(2)))


def test_batches_mask_all_but_label_and_eos(folder, tiny_cogvlm):
    from recipes.cogvlm.family import CogVLM

    data = CaptchaDataModule(root=str(folder), batch_size=4, eval_batch_size=3, num_workers=0)
    data.connect(CogVLM.data_processor(checkpoint=tiny_cogvlm))  # as the engine connects them: no weights loaded
    data.setup()
    tokenizer = data.processor.tokenizer
    train = next(iter(data.train_dataloader()))
    assert train["images"].shape == (4, 3, 28, 28) and len(train["key"]) == 4
    for row, labels, label in zip(train["input_ids"], train["labels"], train["label"]):
        answer = labels[labels != IGNORE_INDEX]
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer, skip_special_tokens=True).strip() == label
        assert torch.equal(row[-len(answer):], answer)  # the answer ends the (left-padded) row
    val = next(iter(data.val_dataloader()))
    assert set(val) >= {"prompt_input_ids", "prompt_attention_mask", "preview", "label", "key", "labels"}
    prompt = val["prompt_input_ids"][0][val["prompt_attention_mask"][0].bool()]
    full = val["input_ids"][0][val["attention_mask"][0].bool()]
    assert torch.equal(full[:len(prompt)], prompt)  # the generation prompt is the training row minus the answer
    assert tokenizer.decode(prompt[-9:]).strip() == "CAPTCHA:"
    assert val["preview"][0].dtype == np.uint8 and val["preview"][0].shape == (30, 80, 3)


def test_a_split_left_empty_by_rounding_says_what_each_split_got(tmp_path):
    for label in LABELS[:3]:
        _captcha(label).save(tmp_path / f"{label}.png")
    with pytest.raises(DataError, match=r"the data.split_fractions=\[0.8, 0.05, 0.15\] split of 3 image\(s\) gives "
                                        r"train 3, val 0, test 0: val and test are empty. Use at least 20 images"):
        CaptchaDataModule(root=str(tmp_path)).check()
    splits = CaptchaDataModule(root=str(tmp_path), split_fractions=(1.0, 0.0, 0.0)).check()  # no val/test: asked for
    assert [len(splits[s]) for s in ("train", "val", "test")] == [3, 0, 0]
    with pytest.raises(DataError, match=r"data.demo_count=3: .* gives train 3, val 0, test 0"):
        CaptchaDataModule(demo_count=3).check()


def test_a_cut_off_captcha_fails_or_is_skipped(folder):
    image = folder / "zz9x.jpg"
    _captcha("zz9x").save(image, quality=95)
    image.write_bytes(image.read_bytes()[:200])
    with pytest.raises(DataError, match=r"(?s)1 bad image\(s\) of 25.*zz9x\.jpg: not a readable image"):
        CaptchaDataModule(root=str(folder)).check()
    with pytest.warns(UserWarning, match=r"skipped \(data.on_bad_sample=skip\): .*zz9x\.jpg"):
        splits = CaptchaDataModule(root=str(folder), on_bad_sample="skip").check()
    keys = [key for ds in splits.values() for key in ds["key"]]
    assert len(keys) == 24 and "zz9x.jpg" not in keys
