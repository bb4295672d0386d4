"""Captioning with the CogVLM family: videos with CogVLM2-Caption, images with CogVLM2 chat (`cogft caption`).

`CogVLMFamily.captioner(model)` returns a `CogVLMCaptioner` (the family-interface object `finetune/cogft/caption.py`
drives): `caption_videos(paths)` / `caption_images(paths)` -> captions, in batches, greedy as the published demo
(`top_k=1, do_sample=False`). `model` is a hub id, a local folder or `tiny`: a tiny random CogVLM2-Video saved in
the published layout (config.json of `CogVLMVideoForCausalLM`, sharded safetensors, a tokenizer), captioning
gibberish offline, and a tiny CogVLM2 for images.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from finetune.hub import resolve_pretrained

from .configuration_cogvlm import CogVLMConfig
from .modeling_cogvlm import CogVLMForCausalLM
from .prompting import build_conversation_input_ids, collate_left_padded, preprocess_image
from .tiny import build_tiny_tokenizer, save_tiny_cogvlm, tiny_cogvlm_config
from .video_cogvlm import (
    CAPTION_MAX_NEW_TOKENS,
    CAPTION_PROMPT,
    MAX_FRAMES,
    CogVLMVideoForCausalLM,
    build_video_conversation_input_ids,
    preprocess_video,
    sample_frame_indices,
)

VIDEO_MODEL = "THUDM/cogvlm2-llama3-caption"
IMAGE_MODEL = "THUDM/cogvlm2-llama3-chat-19B"
#: The prompt for images (CogVLM2 chat); `--prompt` replaces it.
IMAGE_PROMPT = "Please describe this image in detail."
#: The repositories this family captions with (and anything whose config.json names a CogVLM architecture).
KNOWN_MODELS = (VIDEO_MODEL, "THUDM/cogvlm2-video-llama3-chat", IMAGE_MODEL)


def tiny_caption_config(**overrides) -> CogVLMConfig:
    """A tiny CogVLM2-Video with the released per-frame layout: 32 px frames, 2 px patches -> 16 x 16 patches -> the 2x2
    conv -> 64 tokens + boi + eoi = 66 per frame (the published prompt builder hard-codes 66); decoder 64 wide, 2
    layers, GQA 4/2 heads, no vision experts (as published), chat template."""
    settings = dict(cogvlm2=True, image_size=32, vision_config={"patch_size": 2}, template_version="chat",
                    architectures=["CogVLMVideoForCausalLM"])  # -> vision_experts=False, as the released decoder
    settings.update(overrides)
    return tiny_cogvlm_config(**settings)


def save_tiny_caption_model(directory: str | os.PathLike, seed: int = 0, **overrides) -> str:
    """Write the tiny CogVLM2-Video (several safetensors shards + index, as the released repository) and the tiny
    tokenizer into `directory`."""
    torch.manual_seed(seed)
    model = CogVLMVideoForCausalLM(tiny_caption_config(**overrides)).eval()
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    model.save_pretrained(directory, max_shard_size=total // 3)
    build_tiny_tokenizer().save_pretrained(directory)
    return str(directory)


def resolve_caption_model(path: str, video: bool) -> str:
    """The local folder of a caption model: `tiny` builds (once, in the kit's cache) the tiny CogVLM2-Video (video)
    or the tiny CogVLM2 (images)."""
    if video:
        return resolve_pretrained(path, family="cogvlm2-caption", build_tiny=save_tiny_caption_model,
                                  marker="config.json")
    return resolve_pretrained(path, family="cogvlm2-chat",
                              build_tiny=lambda d: save_tiny_cogvlm(d, cogvlm2=True, template_version="chat"),
                              marker="config.json")


def claims(model: str) -> bool:
    """Whether `model` is one this family captions with: `tiny`, a known THUDM CogVLM2 id, or a local folder whose
    config.json names a CogVLM architecture."""
    if model == "tiny" or model in KNOWN_MODELS:
        return True
    config = Path(model).expanduser() / "config.json"
    if config.is_file():
        import json

        architectures = json.loads(config.read_text(encoding="utf-8")).get("architectures") or []
        return any(name.startswith("CogVLM") for name in architectures)
    return False


def video_timestamps(path: str | os.PathLike) -> list[float]:
    """Each frame's start time in seconds (decord's `get_frame_timestamp(...)[:, 0]`), by demuxing with PyAV."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        base = float(stream.time_base)
        start = stream.start_time or 0
        times = [((frame.pts or 0) - start) * base for frame in container.decode(stream)]
    if not times:
        raise ValueError(f"{path}: no video frames decode")
    return times


def read_video(path: str | os.PathLike, num_frames: int = MAX_FRAMES) -> np.ndarray:
    """The frames the published demo would caption, uint8 [T, H, W, 3] (`sample_frame_indices`, "chat")."""
    import av

    indices = sample_frame_indices(video_timestamps(path), num_frames)
    wanted, frames = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(container.streams.video[0])):
            if i in wanted:
                frames[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return np.stack([frames[i] for i in indices])


def _quantization_config(quantize: str | None, dtype: torch.dtype):
    if quantize in (None, "", "none"):
        return None
    if quantize not in ("nf4", "int8"):
        raise ValueError(f"quantize={quantize!r}: use nf4 or int8 (bitsandbytes, CUDA), or leave it unset.")
    if not torch.cuda.is_available():
        raise ValueError(f"quantize={quantize} needs a CUDA GPU (bitsandbytes' 4/8-bit layers): leave it unset on "
                         f"this machine.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ValueError(f"quantize={quantize} needs bitsandbytes: pip install 'cog-finetune[memory]' (CUDA only), or "
                         "leave it unset (bf16 needs about 40 GB for the 19B CogVLM2 models).") from None
    from transformers import BitsAndBytesConfig

    if quantize == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


class CogVLMCaptioner:
    """Loads one model (video or image) on first use and captions files with it, `batch_size` at a time."""

    def __init__(self, video_model: str = VIDEO_MODEL, image_model: str = IMAGE_MODEL, dtype: str = "bf16",
                 quantize: str | None = None, device: str | None = None, prompt: str | None = None,
                 max_new_tokens: int | None = None, batch_size: int = 1, num_frames: int = MAX_FRAMES):
        from finetune.family import parse_dtype

        self.models = {"video": video_model, "image": image_model}
        self.dtype, self.quantize = parse_dtype(dtype), quantize
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.batch_size, self.num_frames = batch_size, num_frames
        self._loaded: dict[str, tuple] = {}
        _quantization_config(quantize, self.dtype)  # a bad value or missing bitsandbytes stops here, before loading

    def describe(self, kind: str) -> str:
        return self.models[kind]

    def _load(self, kind: str):
        if kind not in self._loaded:
            from .tokenizer import load_tokenizer

            local = resolve_caption_model(self.models[kind], video=kind == "video")
            cls = CogVLMVideoForCausalLM if kind == "video" else CogVLMForCausalLM
            quantization = _quantization_config(self.quantize, self.dtype)
            options = {"quantization_config": quantization, "device_map": {"": self.device}} if quantization else {}
            model = cls.from_pretrained(local, dtype=self.dtype, **options).eval()
            if not quantization:
                model.to(self.device)
            self._loaded[kind] = (model, load_tokenizer(local, tokenizer_path=None))
        return self._loaded[kind]

    def _generate(self, model, tokenizer, samples: list[dict], images) -> list[str]:
        batch = collate_left_padded(samples, tokenizer.pad_token_id)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        max_new = self.max_new_tokens or CAPTION_MAX_NEW_TOKENS
        eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
        with torch.no_grad():
            output = model.generate(**batch, images=images, max_new_tokens=max_new, do_sample=False,
                                    eos_token_id=eos, pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        return [text.strip() for text in texts]

    def caption_videos(self, paths: list[str]) -> list[str]:
        model, tokenizer = self._load("video")
        config, dtype = model.config, next(model.parameters()).dtype
        videos = [preprocess_video(read_video(p, self.num_frames), config.vision_config["image_size"]) for p in paths]
        samples = [build_video_conversation_input_ids(tokenizer, self.prompt or CAPTION_PROMPT, len(video),
                                                      config.num_image_tokens, template_version="chat")
                   for video in videos]
        return self._generate(model, tokenizer, samples, [v.to(self.device, dtype) for v in videos])

    def caption_images(self, paths: list[str]) -> list[str]:
        from PIL import Image, ImageOps

        model, tokenizer = self._load("image")
        config, dtype = model.config, next(model.parameters()).dtype
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(preprocess_image(ImageOps.exif_transpose(image), config.vision_config["image_size"]))
        sample = build_conversation_input_ids(tokenizer, self.prompt or IMAGE_PROMPT, images=1, template_version="chat",
                                              image_token_count=config.num_image_tokens)
        return self._generate(model, tokenizer, [sample] * len(paths), torch.stack(images).to(self.device, dtype))
