"""CogVLM prompts, training labels, left-padded batches and image preprocessing.

Follows the published `build_conversation_input_ids` / `_history_to_prompt` (THUDM/cogvlm-chat-hf, and the
`answer` extension of THUDM/cogvlm2-llama3-chat-19B used by its finetune demo):
`[bos] + [pad] * image_tokens (type 1) + text tokens (type 0)` [+ answer tokens + eos when training].
The image transform is torchvision's Resize(bicubic) + ToTensor + Normalize(CLIP mean/std) redone with PIL and
torch, because there is no CPU build of torchvision for the kit's torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from finetune.data import Processor

from .tokens import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE

IGNORE_INDEX = -100
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def history_to_prompt(template_version: str, history: Sequence[tuple[str, str]] | None, query: str) -> str:
    """base: the query as is (history ignored, as published); chat: "Question: {q} Answer:"; vqa: "Question: {q}
    Short answer:", earlier turns each as "Question: {q} Answer: {a}\\n"."""
    if template_version == "base":
        return query
    if template_version not in ("chat", "vqa"):
        raise ValueError(f"template_version must be 'base', 'chat' or 'vqa', got {template_version!r}.")
    answer_format = "Answer:" if template_version == "chat" else "Short answer:"
    prompt = "".join(f"Question: {old_query} {answer_format} {response}\n" for old_query, response in history or [])
    return prompt + f"Question: {query} {answer_format}"


def build_conversation_input_ids(
    tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    images: int | Sequence | None = None,
    template_version: str = "base",
    answer: str | None = None,
    image_token_count: int | None = None,
) -> dict[str, torch.Tensor]:
    """One sample as 1-D LongTensors: input_ids, token_type_ids, attention_mask, and labels when `answer` is given.

    images: None/0 for a text-only prompt, or 1 (an int, or a sequence of one image; only the count is used here —
        preprocess the image itself with `preprocess_image`). At most one image, as in the published code.
    image_token_count: tokens per image, `model.config.num_image_tokens` (1227 for CogVLM1-490); required with an
        image.
    answer: appended as its tokens + EOS; labels are IGNORE_INDEX (-100) everywhere else, so the loss covers only
        the answer and its EOS.
    """
    num_images = images if isinstance(images, int) else len(images) if images is not None else 0
    if num_images > 1:
        raise ValueError(f"CogVLM prompts hold at most one image, got {num_images}.")
    if num_images and not image_token_count:
        raise ValueError("Pass image_token_count (model.config.num_image_tokens) for a prompt with an image.")
    input_ids = [tokenizer.bos_token_id]
    token_type_ids = [LANGUAGE_TOKEN_TYPE]
    if num_images:
        # Placeholders: the model writes the image features over the vision-token positions.
        input_ids += [tokenizer.pad_token_id] * image_token_count
        token_type_ids += [VISION_TOKEN_TYPE] * image_token_count
    return text_sample(tokenizer, input_ids, token_type_ids, history_to_prompt(template_version, history, query),
                       answer)


def text_sample(tokenizer, input_ids: list[int], token_type_ids: list[int], prompt: str,
                answer: str | None = None) -> dict[str, torch.Tensor]:
    """The sample's tail after its image tokens: `prompt` (+ `answer` + EOS, the labels IGNORE_INDEX elsewhere),
    language tokens, appended to `input_ids` / `token_type_ids`; the sample as 1-D LongTensors."""
    text_ids = tokenizer.encode(prompt, add_special_tokens=False)
    input_ids = input_ids + text_ids
    token_type_ids = token_type_ids + [LANGUAGE_TOKEN_TYPE] * len(text_ids)
    sample = {}
    if answer is not None:
        answer_ids = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
        sample["labels"] = torch.tensor([IGNORE_INDEX] * len(input_ids) + answer_ids)
        input_ids += answer_ids
        token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(answer_ids)
    sample["input_ids"] = torch.tensor(input_ids)
    sample["token_type_ids"] = torch.tensor(token_type_ids)
    sample["attention_mask"] = torch.ones(len(input_ids), dtype=torch.long)
    return sample


def collate_left_padded(samples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack samples, padding on the LEFT (generation appends on the right): input_ids with pad_token_id,
    token_type_ids 0, attention_mask 0, labels -100. Samples' "images" ([3, S, S] tensors or None) are stacked in
    sample order into one [N, 3, S, S] tensor, the order in which the model consumes them."""
    pad_values = {
        "input_ids": pad_token_id,
        "token_type_ids": LANGUAGE_TOKEN_TYPE,
        "attention_mask": 0,
        "labels": IGNORE_INDEX,
    }
    length = max(len(sample["input_ids"]) for sample in samples)
    batch = {}
    for key, pad_value in pad_values.items():
        if key not in samples[0]:
            continue
        rows = [torch.as_tensor(sample[key]) for sample in samples]
        batch[key] = torch.stack([torch.cat((row.new_full((length - len(row),), pad_value), row)) for row in rows])
    images = [sample["images"] for sample in samples if sample.get("images") is not None]
    if images:
        batch["images"] = torch.stack(images)
    return batch


def preprocess_image(image: Image.Image, image_size: int) -> torch.Tensor:
    """PIL image -> normalized float tensor [3, image_size, image_size] (bicubic resize, CLIP mean/std)."""
    image = image.convert("RGB").resize((image_size, image_size), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (pixels - mean) / std


PROMPT_KEYS = ("input_ids", "token_type_ids", "attention_mask")


class CogVLMProcessor(Processor):
    """A raw sample {image (PIL), label, key} -> a CogVLM sample: the prompt `[bos] + image placeholders +
    tokens(query)` in the checkpoint's template, the label's tokens and EOS appended with labels -100 everywhere
    else (loss on the label and EOS only, as the official captcha finetune), the image resized and normalised.
    Evaluation samples (`train=False`) also carry the prompt alone (`prompt_*`, for greedy decoding) and the
    original image as `preview` (uint8 HxWx3, for prediction tables). Batches are left-padded."""

    def __init__(self, tokenizer, query: str, template_version: str, image_size: int, image_token_count: int,
                 model_dir: str | None = None):
        super().__init__(spec=None)
        self.tokenizer, self.query, self.template_version = tokenizer, query, template_version
        self.image_size, self.image_token_count, self.model_dir = image_size, image_token_count, model_dir

    def prompt(self, answer: str | None = None) -> dict[str, torch.Tensor]:
        return build_conversation_input_ids(self.tokenizer, self.query, images=1, answer=answer,
                                            template_version=self.template_version,
                                            image_token_count=self.image_token_count)

    def __call__(self, sample: dict, train: bool = True) -> dict:
        image = sample["image"].convert("RGB")
        processed = self.prompt(answer=sample["label"])
        processed["images"] = preprocess_image(image, self.image_size)
        if not train:
            prompt = self.prompt()
            processed.update({f"prompt_{k}": prompt[k] for k in PROMPT_KEYS})
            processed["preview"] = np.asarray(image)
        return {**processed, "label": sample["label"], "key": sample["key"]}

    def prompt_batch(self, images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The prompt alone for each image, left-padded, for decoding (inference)."""
        samples = [{**self.prompt(), "images": preprocess_image(image.convert("RGB"), self.image_size)}
                   for image in images]
        return collate_left_padded(samples, self.tokenizer.pad_token_id)

    def collate(self, samples: list[dict]) -> dict:
        pad = self.tokenizer.pad_token_id
        batch = collate_left_padded(samples, pad)
        if "prompt_input_ids" in samples[0]:
            prompts = [{k: s[f"prompt_{k}"] for k in PROMPT_KEYS} for s in samples]
            batch.update({f"prompt_{k}": v for k, v in collate_left_padded(prompts, pad).items()})
            batch["preview"] = [s["preview"] for s in samples]
        batch["label"] = [s["label"] for s in samples]
        batch["key"] = [s["key"] for s in samples]
        return batch
