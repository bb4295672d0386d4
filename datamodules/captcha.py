"""Captcha recognition data for CogVLM, on Hugging Face `datasets` (sources: datamodules/captcha_sources.py).

Every sample becomes the official finetune's prompt (THUDM/CogVLM `finetune_demo`, REFERENCE section 4):
`[bos] + image placeholders + tokens("CAPTCHA:")` with the base template, the label's tokens and EOS appended for
training, labels -100 everywhere but the label and EOS; the image resized to the model's size (bicubic) and
normalised with the CLIP mean/std. Batches are left-padded (generation appends on the right):
- train: `input_ids`, `token_type_ids`, `attention_mask`, `labels`, `images` [B, 3, S, S], `label`, `key`;
- val/test: the same plus the prompt alone (`prompt_input_ids`, `prompt_token_type_ids`,
  `prompt_attention_mask`) for greedy decoding, and `preview` (the original images, uint8 HxWx3) for tables.
The tokenizer and image size come from the model folder (`model_path`), as the family loads them.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import torch

from datamodules.captcha_sources import CaptchaGenerator, folder_splits, hf_splits
from datamodules.sampling import ResumableShuffle
from recipes.cogvlm.prompting import build_conversation_input_ids, collate_left_padded, preprocess_image

PROMPT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


class CaptchaEncoder:
    """Image + label -> one CogVLM training sample (and, for evaluation, the prompt alone)."""

    def __init__(self, tokenizer, prompt: str, template_version: str, image_size: int, image_token_count: int,
                 generator: CaptchaGenerator | None = None):
        self.tokenizer, self.prompt, self.template_version = tokenizer, prompt, template_version
        self.image_size, self.image_token_count, self.generator = image_size, image_token_count, generator

    def sample(self, image, label: str, with_prompt: bool) -> dict:
        image = image.convert("RGB")
        sample = build_conversation_input_ids(self.tokenizer, self.prompt, images=1, answer=label,
                                              template_version=self.template_version,
                                              image_token_count=self.image_token_count)
        sample["images"] = preprocess_image(image, self.image_size)
        if with_prompt:
            prompt = build_conversation_input_ids(self.tokenizer, self.prompt, images=1,
                                                  template_version=self.template_version,
                                                  image_token_count=self.image_token_count)
            sample.update({f"prompt_{k}": prompt[k] for k in PROMPT_KEYS})
            sample["preview"] = np.asarray(image)
        return sample

    def __call__(self, rows: dict, with_prompt: bool = False) -> dict:
        """A `datasets` transform: a batch of rows -> columns of per-sample tensors."""
        labels = [str(label).strip() for label in rows["label"]]
        images = rows["image"] if "image" in rows else [self.generator.image(i) for i in rows["index"]]
        samples = [self.sample(image, label, with_prompt) for image, label in zip(images, labels)]
        columns = {name: [s[name] for s in samples] for name in samples[0]}
        return {**columns, "label": labels, "key": list(rows["key"])}


def collate(samples: list[dict], pad_token_id: int) -> dict:
    batch = collate_left_padded(samples, pad_token_id)
    if "prompt_input_ids" in samples[0]:
        prompts = [{k: s[f"prompt_{k}"] for k in PROMPT_KEYS} for s in samples]
        batch.update({f"prompt_{k}": v for k, v in collate_left_padded(prompts, pad_token_id).items()})
        batch["preview"] = [s["preview"] for s in samples]
    batch["label"] = [s["label"] for s in samples]
    batch["key"] = [s["key"] for s in samples]
    return batch


class CaptchaDataModule(L.LightningDataModule):
    """Args:
        root: a folder of captchas named by their label (Kaggle layout), or `demo` for captchas generated on the
            fly (the `demo_*` options). Ignored when `hf_dataset` is set.
        hf_dataset: a Hugging Face dataset name (e.g. project-sloth/captcha-images) or a `save_to_disk` folder.
        image_column, text_column: its image and label columns.
        hf_splits: its split names for train/val/test (default train/validation/test); a dataset with one split
            is cut like a folder.
        split_fractions, split_seed: the folder / generated / single-split cut (official: 0.8/0.05/0.15, 2023).
        model_path, tokenizer_path: where the tokenizer and the image size come from (`${model.*}`).
        prompt, template_version: the query ("CAPTCHA:") and template (null: the checkpoint's, base for
            cogvlm-base-490-hf).
        batch_size: training batch per device; eval_batch_size: validation/test batch (greedy decoding).
        num_workers: loading processes; seed: training order (independent of the split).
        check_images: decode every image in `check()` (before the model loads) to name broken files.
        demo_count, demo_length, demo_charset, demo_width, demo_height, demo_seed: the generated captchas.
    """

    def __init__(self, root: str = "demo", hf_dataset: str | None = None, image_column: str = "image",
                 text_column: str = "solution", hf_splits: dict | None = None,
                 split_fractions: tuple[float, float, float] = (0.8, 0.05, 0.15), split_seed: int = 2023,
                 model_path: str = "THUDM/cogvlm-base-490-hf", tokenizer_path: str = "lmsys/vicuna-7b-v1.5",
                 prompt: str = "CAPTCHA:", template_version: str | None = None, batch_size: int = 4,
                 eval_batch_size: int = 8, num_workers: int = 2, seed: int = 0, check_images: bool = True,
                 demo_count: int = 1000, demo_length: int = 4,
                 demo_charset: str = "0123456789abcdefghijklmnopqrstuvwxyz", demo_width: int = 160,
                 demo_height: int = 60, demo_seed: int = 2023):
        super().__init__()
        self.root, self.hf_dataset, self.hf_split_names = root, hf_dataset, dict(hf_splits or {})
        self.image_column, self.text_column = image_column, text_column
        self.split_fractions, self.split_seed = tuple(split_fractions), split_seed
        self.model_path, self.tokenizer_path = model_path, tokenizer_path
        self.prompt, self.template_version = prompt, template_version
        self.batch_size, self.eval_batch_size, self.num_workers, self.seed = batch_size, eval_batch_size, num_workers, seed
        self.check_images = check_images
        self.generator = None
        if not hf_dataset and root == "demo":
            self.generator = CaptchaGenerator(demo_count, demo_length, demo_charset, demo_width, demo_height, demo_seed)
        self.splits: dict | None = None
        self.encoder: CaptchaEncoder | None = None

    def check(self) -> dict:
        """Load the splits and decode every image, before the model is loaded; a bad file stops here, named."""
        if self.splits is None:
            if self.hf_dataset:
                self.splits = hf_splits(self.hf_dataset, self.image_column, self.text_column, self.hf_split_names,
                                        self.split_fractions, self.split_seed, self.check_images)
            elif self.generator is not None:
                self.splits = self.generator.splits(self.split_fractions, self.split_seed)
            else:
                self.splits = folder_splits(Path(self.root).expanduser(), self.split_fractions, self.split_seed,
                                            self.check_images)
        return self.splits

    def build_encoder(self) -> CaptchaEncoder:
        from finetune.hub import resolve_pretrained
        from recipes.cogvlm import CogVLMConfig, save_tiny_cogvlm
        from recipes.cogvlm.family import load_tokenizer

        local = resolve_pretrained(self.model_path, family="cogvlm", build_tiny=save_tiny_cogvlm,
                                   marker="config.json")
        config = CogVLMConfig.from_pretrained(local)
        return CaptchaEncoder(load_tokenizer(local, self.tokenizer_path), self.prompt,
                              self.template_version or config.template_version,
                              config.vision_config["image_size"], config.num_image_tokens, self.generator)

    def setup(self, stage: str | None = None) -> None:
        splits = self.check()
        if self.encoder is None:
            self.encoder = self.build_encoder()
        self.datasets = {split: ds.with_transform(partial(self.encoder, with_prompt=split != "train"))
                         for split, ds in splits.items()}
        self.collate = partial(collate, pad_token_id=self.encoder.tokenizer.pad_token_id)

    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # Stateful + ResumableShuffle: a resumed run sees the batches an uninterrupted run would (datamodules/
        # video.py); its own generator keeps the loader's worker seeding off the global RNG.
        dataset = self.datasets["train"]
        return StatefulDataLoader(dataset, batch_size=self.batch_size, sampler=ResumableShuffle(len(dataset), self.seed),
                                  generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers,
                                  collate_fn=self.collate)

    def _eval_loader(self, split: str):
        from torch.utils.data import DataLoader

        return DataLoader(self.datasets[split], batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, collate_fn=self.collate)

    def val_dataloader(self):
        return self._eval_loader("val")

    def test_dataloader(self):
        return self._eval_loader("test")
