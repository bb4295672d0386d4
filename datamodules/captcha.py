"""Captcha recognition data, on Hugging Face `datasets` (sources: datamodules/captcha_sources.py).

Each sample is raw: the captcha `image` (PIL), its `label` (the text it shows) and a `key`. The model family
turns it into model inputs (prompt template, tokens, image preprocessing, batching) through the processor the
engine hands over (`connect`): for CogVLM, `recipes/cogvlm/prompting.py`. Training batches are shuffled
resumably; validation and test batches keep the split's order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from datamodules.captcha_sources import CaptchaGenerator, folder_splits, hf_splits
from datamodules.sample_checks import OnBadSample
from datamodules.sampling import ResumableShuffle
from finetune.data import FamilyDataModule


def raw_samples(rows: dict, generator: CaptchaGenerator | None) -> list[dict]:
    """A `datasets` batch of rows -> raw samples {image, label, key} (generated captchas are drawn here)."""
    images = rows["image"] if "image" in rows else [generator.image(i) for i in rows["index"]]
    return [{"image": image.convert("RGB"), "label": str(label).strip(), "key": key}
            for image, label, key in zip(images, rows["label"], rows["key"])]


class CaptchaSamples:
    """A split's transform: a `datasets` batch of rows -> the family's processed samples. An object holding only what
    it needs rather than a bound method of the data module: `datasets` fingerprints a transform by pickling it, and a
    bound method would pickle the data module and, once Lightning attached it, the trainer and the model."""

    def __init__(self, processor, generator: CaptchaGenerator | None, train: bool):
        self.processor, self.generator, self.train = processor, generator, train

    def __call__(self, rows: dict) -> dict:
        samples = [self.processor(sample, train=self.train) for sample in raw_samples(rows, self.generator)]
        return {name: [s[name] for s in samples] for name in samples[0]}


class CaptchaDataModule(FamilyDataModule):
    """Args:
        root: a folder of captchas named by their label (Kaggle layout), or `demo` for captchas generated on the
            fly (the `demo_*` options). Ignored when `hf_dataset` is set.
        hf_dataset: a Hugging Face dataset name (e.g. project-sloth/captcha-images) or a `save_to_disk` folder.
        image_column, text_column: its image and label columns.
        hf_splits: its split names for train/val/test (default train/validation/test); a dataset with one split
            is cut like a folder.
        split_fractions, split_seed: the folder / generated / single-split cut (official: 0.8/0.05/0.15, 2023).
        batch_size: training batch per device; eval_batch_size: validation/test batch (greedy decoding).
        num_workers: loading processes; seed: training order (independent of the split).
        check_images: decode every image in `check()` (before the model loads, in parallel) to name broken files.
        on_bad_sample: `fail` stops on an undecodable image, naming every one; `skip` leaves each out with a
            warning and counts them (the split is made from the images that are left).
        demo_count, demo_length, demo_charset, demo_width, demo_height, demo_seed: the generated captchas.
    """

    # checked by finetune.settings.check before anything is built
    setting_ranges = {"batch_size": ">=1", "eval_batch_size": ">=1", "num_workers": ">=0",
                      "split_fractions": "[0, 1]", "demo_count": ">=3", "demo_length": ">=1", "demo_width": ">=8",
                      "demo_height": ">=8"}

    def __init__(self, root: str = "demo", hf_dataset: str | None = None, image_column: str = "image",
                 text_column: str = "solution", hf_splits: dict | None = None,
                 split_fractions: tuple[float, float, float] = (0.8, 0.05, 0.15), split_seed: int = 2023,
                 batch_size: int = 4, eval_batch_size: int = 8, num_workers: int = 2, seed: int = 0,
                 check_images: bool = True, demo_count: int = 1000, demo_length: int = 4,
                 demo_charset: str = "0123456789abcdefghijklmnopqrstuvwxyz", demo_width: int = 160,
                 demo_height: int = 60, demo_seed: int = 2023, on_bad_sample: OnBadSample = "fail"):
        super().__init__()
        self.on_bad_sample = on_bad_sample
        self.root, self.hf_dataset, self.hf_split_names = root, hf_dataset, dict(hf_splits or {})
        self.image_column, self.text_column = image_column, text_column
        self.split_fractions, self.split_seed = tuple(split_fractions), split_seed
        self.batch_size, self.eval_batch_size, self.num_workers, self.seed = batch_size, eval_batch_size, num_workers, seed
        self.check_images = check_images
        self.generator = None
        if not hf_dataset and root == "demo":
            self.generator = CaptchaGenerator(demo_count, demo_length, demo_charset, demo_width, demo_height, demo_seed)
        self.splits: dict | None = None

    def check(self) -> dict:
        """Load the splits and decode every image, before the model is loaded; a bad file stops here, named."""
        if self.splits is None:
            if self.hf_dataset:
                self.splits = hf_splits(self.hf_dataset, self.image_column, self.text_column, self.hf_split_names,
                                        self.split_fractions, self.split_seed, self.check_images, self.on_bad_sample)
            elif self.generator is not None:
                self.splits = self.generator.splits(self.split_fractions, self.split_seed)
            else:
                self.splits = folder_splits(Path(self.root).expanduser(), self.split_fractions, self.split_seed,
                                            self.check_images, self.on_bad_sample)
        return self.splits

    def setup(self, stage: str | None = None) -> None:
        splits = self.check()
        processor = self.require_processor()
        self.datasets = {split: ds.with_transform(CaptchaSamples(processor, self.generator, train=split == "train"))
                         for split, ds in splits.items()}
        self.collate = processor.collate

    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # Stateful + ResumableShuffle: a resumed run sees the batches an uninterrupted run would (datamodules/
        # video.py); its own generator keeps the loader's worker seeding off the global RNG.
        dataset = self.datasets["train"]
        return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=ResumableShuffle(len(dataset), self.seed),
                                  generator=torch.Generator().manual_seed(self.seed), collate_fn=self.collate,
                                  **self.loader_options())

    def _eval_loader(self, split: str):
        from torch.utils.data import DataLoader

        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=self.collate)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")
