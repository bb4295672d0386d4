"""What a model family asks of its data, and how the engine hands it to a data module.

A data module (`datamodules/`) yields raw samples: media, a caption or label, a `key`. Everything
model-specific about a sample -- its size and frame rules, the limits of its aspect buckets, tokenising and
prompt templates, how samples stack into a batch -- belongs to the family, which describes it as a
`Processor` before any weights load (`ModelFamily.data_processor`). The engine connects the two
(`FamilyDataModule.connect`), so a data module never imports a model and a family never imports a data module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import lightning as L
import torch

from finetune.errors import UserError


class DataError(UserError, ValueError):
    """Bad training data or settings, found before any expensive work starts. The message names the file or
    option, the value and the fix."""


@dataclass(frozen=True)
class VideoSpec:
    """Clips the family trains on.

    `buckets`: the (frames, height, width) sizes the model accepts (the family has checked each against its own
    frame and size rules); a clip is sampled and resized/cropped to one of them and a batch holds one bucket.
    `conditioning_image`: each sample also carries `image` [3, H, W] in [-1, 1], the image the video starts
    from (image-to-video): the one the data names for the clip, else the clip's first frame.
    `one_frame`: the family also trains on images, each a one-frame video in a (1, H, W) bucket of its own (one per
    (H, W) of `buckets`); False: the data module refuses images before the model loads."""

    buckets: tuple[tuple[int, int, int], ...]
    conditioning_image: bool = False
    one_frame: bool = False


@dataclass(frozen=True)
class ImageSpec:
    """Aspect-ratio buckets the family can train on: about `pixels` pixels each, sides multiples of `multiple`
    in `min_side..max_side`, at most `max_pixels` pixels."""

    pixels: int
    min_side: int
    max_side: int
    multiple: int
    max_pixels: int
    #: the family needs a control image per sample (`control_image`, the same bucket as `image`: CogView4 control); a
    #: data module that cannot give one stops before the model loads
    control_image: bool = False


def load_tokenizer(directory: str):
    """The tokenizer in `directory` as its pipeline loads it: the transformers class the checkpoint's
    `model_index.json` names for that folder (e.g. `T5Tokenizer`, `PreTrainedTokenizerFast`), else `AutoTokenizer`;
    never remote code."""
    import json
    from pathlib import Path

    import transformers

    folder = Path(directory)
    index = folder.parent / "model_index.json"
    named = json.loads(index.read_text()).get(folder.name) if index.is_file() else None
    cls = getattr(transformers, named[1], None) if isinstance(named, list) and len(named) == 2 else None
    return (cls or transformers.AutoTokenizer).from_pretrained(str(folder))


class TextLimit:
    """How many tokens of a caption the text encoder reads: `max_tokens` (`model.max_sequence_length`) tokens of
    `tokenizer` (a folder, loaded on first use as its pipeline loads it: `load_tokenizer`), counted as the pipeline tokenizes a
    prompt (special tokens included); the rest is cut off by the encoder. `encoder` names it in messages ("T5")."""

    def __init__(self, encoder: str, max_tokens: int, tokenizer: str):
        self.encoder, self.max_tokens, self.tokenizer_dir = encoder, int(max_tokens), str(tokenizer)
        self._tokenizer = None

    def count(self, captions: list[str]) -> list[int]:
        """The token count of each caption, untruncated."""
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self.tokenizer_dir)
        if not captions:
            return []
        ids = self._tokenizer(list(captions), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(x) for x in ids]


class Processor:
    """A family's view of a sample. `spec` tells the data module what to produce (a `VideoSpec`, an `ImageSpec`,
    or None when the family takes the media as it comes); `__call__` turns one raw sample into model inputs
    (tokenising, templates, preprocessing); `collate` stacks processed samples into a batch. The defaults pass
    a sample through and stack tensors. `text_limit` (a `TextLimit`, None: not told) is how many tokens of a
    caption the text encoder reads: the data report counts the captions longer than that
    (`finetune.data_report`, `data.on_long_caption`)."""

    spec: Any = None
    text_limit: TextLimit | None = None

    def __init__(self, spec: Any = None, text_limit: TextLimit | None = None):
        self.spec, self.text_limit = spec, text_limit

    def __call__(self, sample: dict, train: bool = True) -> dict:
        return sample

    def collate(self, samples: list[dict]) -> dict:
        batch = {}
        for name in samples[0]:
            values = [s[name] for s in samples]
            batch[name] = torch.stack(values) if isinstance(values[0], torch.Tensor) else values
        return batch


class FamilyDataModule(L.LightningDataModule):
    """Base of the kit's data modules: `connect` receives the family's processor (before `check`, which
    validates the data against it before the model loads).

    Encode once (`finetune.cache.EncodeOnce`): a data module that implements `sample_index` (and sets
    `self.dataset`, its training dataset in that order, in `setup`, and builds its training loader over
    `self.dataset` when `train_dataloader` is called) has every sample encoded once before training; for the fit the
    engine wraps `self.dataset` after `setup` (`finetune.cache.EncodedSamples`), so that the loader reads the cached
    encodings instead of decoding media. Without it (the default) every batch is decoded and encoded each step."""

    #: the spec class this data module needs from the family (None: any)
    spec_type: type | None = None

    processor: Processor | None = None
    batch_size: int = 1
    num_workers: int = 0

    def connect(self, processor: Processor) -> None:
        if self.spec_type is not None and not isinstance(processor.spec, self.spec_type):
            raise DataError(f"{type(self).__name__} needs a model family that describes its data as "
                            f"{self.spec_type.__name__}, but this family gives {type(processor.spec).__name__}: "
                            f"the recipe pairs a model with the wrong data module (check `data:` in the recipe).")
        self.processor = processor

    def require_processor(self) -> Processor:
        if self.processor is None:
            raise RuntimeError(f"{type(self).__name__}.connect(processor) must be called before check()/setup(): "
                               f"finetune.run.build connects the family's data processor.")
        return self.processor

    def check(self):
        """Validate every sample before the model loads; a bad file stops here, named."""
        raise NotImplementedError

    def sample_index(self) -> list[tuple[str, Hashable]] | None:
        """(key, bucket) of every training sample in the training dataset's order, after `check()`. The key changes
        when anything the encodings depend on changes (the file, the caption, the bucket, the preprocessing); samples
        of one bucket can be stacked into a batch. None (the default): this data module's samples are always decoded."""
        return None

    def loader_options(self) -> dict:
        """The training loader's worker settings: `num_workers` processes kept from one epoch to the next (a small
        dataset would otherwise start new ones every few steps) and, on a GPU, batches in pinned memory, so that
        their copy to the device runs alongside the step instead of first waiting for the device's queued work."""
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None)
        on_gpu = device is not None and device.type == "cuda"
        return {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0, "pin_memory": on_gpu}
