"""CogVLM2-Video / CogVLM2-Caption (THUDM/cogvlm2-llama3-caption, THUDM/cogvlm2-video-llama3-chat), native.

The published `modeling_cogvlm.py` of these repositories (`CogVLMVideoForCausalLM`) is CogVLM2's decoder and vision
tower unchanged -- the same parameter names, `model.vision.*` with the 2x2 `conv` downsample, Llama-3 GQA, rope base
500000 -- fed by a video instead of one image (docs/cogvlm.md#cogvlm2-caption):

- the frames [T, 3, 224, 224] go through the vision tower as a batch: (224 / 14 / 2) ** 2 = 64 patch tokens + boi +
  eoi = 66 image tokens per frame;
- with the "chat" template every frame's 66 tokens are followed by its index as text (`tokenizer.encode("0")`,
  "1", ...: language tokens), then the prompt `Question: {query} Answer:`; "base" puts the frames back to back;
- frames are chosen by the demo's "chat" strategy (`sample_frame_indices`): one frame per second, the frame whose
  timestamp is closest to each whole second, at most 24;
- each frame is scaled to 0..1, normalized with the CLIP mean/std, its short side scaled to 224 (bilinear) and
  centre-cropped to 224 x 224 (`preprocess_video`).

So `CogVLMVideoForCausalLM` is `CogVLMForCausalLM` (the kit's native CogVLM2) whose `images` may be videos: one
[T, 3, S, S] tensor per sample (or the published `[[video]]` nesting); their frames are laid over the vision tokens in
order. Unlike the published code (which encodes `images[0]` only, batch size 1) a left-padded batch of videos works.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .configuration_cogvlm import CogVLMConfig
from .modeling_cogvlm import CogVLMForCausalLM
from .prompting import CLIP_MEAN, CLIP_STD, history_to_prompt, text_sample
from .tokens import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE

#: The prompt of THUDM/CogVideo `tools/caption/video_caption.py` (the captions CogVideoX was trained on).
CAPTION_PROMPT = "Please describe this video in detail."
#: Frames the demo's "chat" strategy takes at most (one per second).
MAX_FRAMES = 24
#: The demo's `max_new_tokens`.
CAPTION_MAX_NEW_TOKENS = 2048


def sample_frame_indices(timestamps: Sequence[float], num_frames: int = MAX_FRAMES,
                         strategy: str = "chat") -> list[int]:
    """The frames the published demo reads (`load_video` of THUDM/CogVLM2 video_demo and CogVideo tools/caption).

    timestamps: each frame's start time in seconds (decord's `get_frame_timestamp(...)[:, 0]`).
    chat: for every whole second s in 0 .. round(last timestamp), the first frame whose timestamp is closest to s,
        at most `num_frames` of them (a 2 s clip gives 3 frames, a minute-long one 24).
    base: `num_frames` evenly spaced over the first 60 s (np.linspace, truncated to int).
    """
    if not len(timestamps):
        raise ValueError("a video without frames has nothing to caption")
    timestamps = [float(t) for t in timestamps]
    if strategy == "base":
        fps = (len(timestamps) - 1) / timestamps[-1] if timestamps[-1] > 0 else 1.0
        end = min(len(timestamps), int(60 * fps))
        return np.linspace(0, end - 1, num_frames, dtype=int).tolist()
    if strategy != "chat":
        raise ValueError(f"frame sampling strategy must be 'chat' or 'base', got {strategy!r}")
    indices = []
    for second in range(round(max(timestamps)) + 1):
        closest = min(timestamps, key=lambda t: abs(t - second))  # the first such frame, as list.index finds it
        indices.append(timestamps.index(closest))
        if len(indices) >= num_frames:
            break
    return indices


def preprocess_video(frames: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 frames [T, H, W, 3] -> float [T, 3, image_size, image_size]: /255, CLIP normalization, short side scaled
    to image_size (bilinear, floor of the long side, as pytorchvideo's ShortSideScale), centre crop (torchvision's
    CenterCropVideo rounding)."""
    video = torch.as_tensor(np.asarray(frames)).permute(0, 3, 1, 2).float() / 255.0  # [T, 3, H, W]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    video = (video - mean) / std
    height, width = video.shape[-2:]
    if width < height:
        size = (int(math.floor(height / width * image_size)), image_size)
    else:
        size = (image_size, int(math.floor(width / height * image_size)))
    # published order: (C, T, H, W) through F.interpolate, which treats C as the batch and T as channels: the same
    # per-frame bilinear resize as here
    video = F.interpolate(video, size=size, mode="bilinear", align_corners=False)
    top = int(round((size[0] - image_size) / 2.0))
    left = int(round((size[1] - image_size) / 2.0))
    return video[..., top:top + image_size, left:left + image_size].contiguous()


def build_video_conversation_input_ids(tokenizer, query: str, num_frames: int, tokens_per_frame: int,
                                       history: Sequence[tuple[str, str]] | None = None,
                                       template_version: str = "chat", answer: str | None = None,
                                       pad_token_id: int | None = None) -> dict[str, torch.Tensor]:
    """One sample as 1-D LongTensors (input_ids, token_type_ids, attention_mask; labels with `answer`), laid out as
    the published `build_conversation_input_ids`: [bos] + per frame ([pad] * tokens_per_frame (type 1) + the frame
    index as text with "chat") + the prompt (+ answer + eos).

    tokens_per_frame: `model.config.num_image_tokens` (66 for the released models). pad_token_id: the placeholder id
    (default the tokenizer's pad; the published code hard-codes 128002, Llama-3's pad, which the model overwrites).
    """
    pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    input_ids, token_type_ids = [tokenizer.bos_token_id], [LANGUAGE_TOKEN_TYPE]
    for index in range(num_frames):
        input_ids += [pad] * tokens_per_frame
        token_type_ids += [VISION_TOKEN_TYPE] * tokens_per_frame
        if template_version == "chat":
            time_ids = tokenizer.encode(str(index), add_special_tokens=False)
            input_ids += time_ids
            token_type_ids += [LANGUAGE_TOKEN_TYPE] * len(time_ids)
    return text_sample(tokenizer, input_ids, token_type_ids, history_to_prompt(template_version, history, query),
                       answer)


def flatten_frames(images) -> torch.Tensor | None:
    """Videos (a [T, 3, S, S] tensor per sample, or the published `[[video]]` nesting), images or a ready
    [N, 3, S, S] batch -> one [N, 3, S, S] batch of frames in sample order."""
    if images is None or isinstance(images, torch.Tensor):
        return images
    frames = []
    for item in images:
        for element in item if isinstance(item, (list, tuple)) else [item]:
            frames.append(element if element.dim() == 4 else element[None])
    return torch.cat(frames) if frames else None


class CogVLMVideoForCausalLM(CogVLMForCausalLM):
    """The published `CogVLMVideoForCausalLM` (same checkpoint keys as CogVLM2): `images` are videos, see the
    module docstring. Everything else (generate, KV cache, greedy_generate, LoRA) is `CogVLMForCausalLM`'s."""

    config_class = CogVLMConfig
    # the released checkpoint has 32 tensors beyond the model's 997 (one per layer: presumably the published rotary
    # buffer, which the kit recomputes and never saves)
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def forward(self, input_ids, images=None, *args, **kwargs):
        return super().forward(input_ids, flatten_frames(images), *args, **kwargs)
