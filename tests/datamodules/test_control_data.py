"""Control-pair data (CogView4 control): pairs from a `control_image` column, a `controls/` folder or a dataset column,
canny computed with OpenCV, depth maps from files, image and control in one bucket, the control in the sample key
(the encoded cache's), and bad or mismatched pairs named before the model loads."""

from __future__ import annotations

import json
from dataclasses import replace

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules.controls import canny
from datamodules.images import ImageDataModule, resize_crop
from datamodules.textfiles import DataError
from finetune.data import ImageSpec, Processor

CONTROL = ImageSpec(pixels=4096, min_side=32, max_side=64, multiple=32, max_pixels=4096, control_image=True)


def control_data(root, **kw) -> ImageDataModule:
    data = ImageDataModule(root=str(root), batch_size=1, **kw)
    data.connect(Processor(CONTROL))
    return data


def picture(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_pairs(root, sizes=((40, 80), (60, 60)), column: bool = True, control_sizes=None):
    """Images 0.png, 1.png with their controls: a `control_image` column naming `edges/i.png`, or `controls/i.png`."""
    root.mkdir(parents=True, exist_ok=True)
    folder = root / ("edges" if column else "controls")
    folder.mkdir()
    rows = []
    for i, (h, w) in enumerate(sizes):
        picture(h, w, i).save(root / f"{i}.png")
        ch, cw = (control_sizes or sizes)[i]
        picture(ch, cw, 10 + i).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"caption {i}",
                     **({"control_image": f"edges/{i}.png"} if column else {})})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return root, folder


def batches_by_key(data) -> dict[str, dict]:
    data.setup()
    return {b["key"][0]: b for b in data.train_dataloader()}


@pytest.mark.parametrize("column", [True, False], ids=["control_image_column", "controls_folder"])
def test_pairs_share_the_images_bucket(tmp_path, column):
    root, folder = write_pairs(tmp_path / "d", column=column)
    data = control_data(root, control="pairs")
    batches = list(batches_by_key(data).values())
    assert len(batches) == 2
    for batch in batches:
        assert batch["control_image"].shape == batch["image"].shape
        i = batch["prompt"][0].split()[-1]
        h, w = batch["image"].shape[2:]
        with Image.open(folder / f"{i}.png") as control:
            torch.testing.assert_close(batch["control_image"][0], resize_crop(control, h, w))


def test_pairs_from_a_dataset_column(tmp_path):
    root = tmp_path / "ds"
    images = [picture(40, 80, 0), picture(60, 60, 1)]
    controls = [picture(40, 80, 5), picture(60, 60, 6)]
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "control_image": datasets.Image()})
    datasets.Dataset.from_dict({"image": images, "text": ["a", "b"], "control_image": controls},
                               features=features).save_to_disk(str(root))
    data = control_data(root, control="pairs")
    batches = sorted(batches_by_key(data).values(), key=lambda b: b["prompt"][0])
    h, w = batches[0]["image"].shape[2:]
    torch.testing.assert_close(batches[0]["control_image"][0], resize_crop(controls[0], h, w))


def test_canny_is_computed_from_the_resized_image_with_opencv(tmp_path):
    import cv2

    root, _ = write_pairs(tmp_path / "d")
    batch = next(iter(batches_by_key(control_data(root, control="canny", canny_low=50, canny_high=150)).values()))
    image = batch["image"][0]
    rgb = ((image.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 50, 150)
    assert edges.any() and not edges.all()
    expected = torch.from_numpy(edges.astype(np.float32) / 127.5 - 1)[None].expand(3, -1, -1)
    torch.testing.assert_close(batch["control_image"][0], expected)
    torch.testing.assert_close(canny(image, 50, 150), expected)
    # other thresholds are another sample: another key for the encoded cache
    other = control_data(root, control="canny", canny_low=10, canny_high=40).sample_index()
    assert {k for k, _ in other}.isdisjoint(batches_by_key(control_data(root, control="canny", canny_low=50,
                                                                        canny_high=150)))


def test_depth_from_file_is_scaled_to_its_range(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    picture(64, 64, 0).save(root / "0.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "0.png", "text": "a room"}) + "\n")
    (root / "depth").mkdir()
    depth = np.tile(np.linspace(1000, 3000, 64, dtype=np.uint16), (64, 1))  # 16-bit depth, a left-right ramp
    Image.fromarray(depth).save(root / "depth" / "0.png")
    (batch,) = batches_by_key(control_data(root, control="depth_from_file")).values()
    control = batch["control_image"][0]
    assert torch.equal(control[0], control[1]) and torch.equal(control[1], control[2])
    assert control[:, :, 0].max() == -1 and control[:, :, -1].min() == 1  # its own range onto 0..255


def test_the_control_file_is_part_of_the_sample_key(tmp_path):
    root, folder = write_pairs(tmp_path / "d")
    before = dict(control_data(root, control="pairs").sample_index())
    picture(40, 80, 99).save(folder / "0.png")
    after = dict(control_data(root, control="pairs").sample_index())
    assert len(set(before) & set(after)) == 1  # only the unchanged pair keeps its cached encoding


def test_mismatched_pair_is_named_before_training(tmp_path):
    root, folder = write_pairs(tmp_path / "d", control_sizes=((40, 80), (64, 60)))
    with pytest.raises(DataError, match=r"edges/1.png.*64x60.*is 60x60") as err:
        control_data(root, control="pairs").check()
    assert "1.png" in str(err.value)


def test_missing_control_is_named(tmp_path):
    root, folder = write_pairs(tmp_path / "d", column=False)
    (folder / "1.png").unlink()
    with pytest.raises(DataError, match=r"controls/1.png does not exist"):
        control_data(root, control="pairs").check()
    skipped = control_data(root, control="pairs", on_bad_sample="skip")
    assert len(skipped.sample_index()) == 1


def test_control_setting_must_fit_the_model(tmp_path):
    root, _ = write_pairs(tmp_path / "d")
    with pytest.raises(DataError, match="set data.control=pairs"):
        control_data(root).check()
    plain = ImageDataModule(root=str(root), control="canny")
    plain.connect(Processor(replace(CONTROL, control_image=False)))
    with pytest.raises(DataError, match="takes no control image"):
        plain.check()
    with pytest.raises(DataError, match="data.control='edges'"):
        control_data(root, control="edges").check()
