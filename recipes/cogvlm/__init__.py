"""CogVLM / CogVLM2 as a native transformers model, its prompts and a tiny test model."""

from .configuration_cogvlm import DEFAULT_VISION_CONFIG, CogVLMConfig
from .modeling_cogvlm import (
    CogVLMForCausalLM,
    CogVLMKVCache,
    CogVLMModel,
    CogVLMPreTrainedModel,
    vision_expert_mask,
)
from .prompting import (
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    build_conversation_input_ids,
    collate_left_padded,
    history_to_prompt,
    preprocess_image,
)
from .tokens import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, build_position_ids
from .video_cogvlm import CogVLMVideoForCausalLM
from .tiny import (
    build_tiny_cogvlm,
    build_tiny_tokenizer,
    save_tiny_cogvlm,
    tiny_cogvlm_config,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_VISION_CONFIG",
    "IGNORE_INDEX",
    "LANGUAGE_TOKEN_TYPE",
    "VISION_TOKEN_TYPE",
    "CogVLMConfig",
    "CogVLMForCausalLM",
    "CogVLMKVCache",
    "CogVLMModel",
    "CogVLMPreTrainedModel",
    "CogVLMVideoForCausalLM",
    "build_conversation_input_ids",
    "build_position_ids",
    "build_tiny_cogvlm",
    "build_tiny_tokenizer",
    "collate_left_padded",
    "history_to_prompt",
    "preprocess_image",
    "save_tiny_cogvlm",
    "tiny_cogvlm_config",
    "vision_expert_mask",
]
