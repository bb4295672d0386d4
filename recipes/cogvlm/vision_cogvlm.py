"""EVA2-CLIP vision tower and GLU adapter of CogVLM / CogVLM2.

Module names follow the published checkpoints (`visual.py` of THUDM/cogvlm-chat-hf and of
THUDM/cogvlm2-llama3-chat-19B), so their `model.vision.*` weights load without renaming.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_cogvlm import CogVLMConfig


class EVA2CLIPPatchEmbedding(nn.Module):
    """14x14 conv patches, a learned CLS token in front, and one learned position per token (CLS included)."""

    def __init__(self, vision: dict):
        super().__init__()
        self.image_size = vision["image_size"]
        self.proj = nn.Conv2d(
            vision["in_channels"], vision["hidden_size"], kernel_size=vision["patch_size"], stride=vision["patch_size"]
        )
        self.cls_embedding = nn.Parameter(torch.zeros(1, vision["hidden_size"]))
        self.position_embedding = nn.Embedding(vision["num_positions"], vision["hidden_size"])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            # The position table has exactly one entry per patch of an image_size x image_size image.
            raise ValueError(
                f"CogVLM expects images of {self.image_size}x{self.image_size} pixels, got "
                f"{tuple(images.shape[-2:])}: resize them first (see recipes.cogvlm.prompting.preprocess_image)."
            )
        x = self.proj(images).flatten(2).transpose(1, 2)  # [B, patches, D]
        cls = self.cls_embedding.expand(x.shape[0], -1, -1)
        return torch.cat((cls, x), dim=1) + self.position_embedding.weight.unsqueeze(0)


class EVA2CLIPAttention(nn.Module):
    """Non-causal multi-head self-attention with a fused, biased QKV projection."""

    def __init__(self, vision: dict):
        super().__init__()
        self.num_heads = vision["num_heads"]
        self.query_key_value = nn.Linear(vision["hidden_size"], vision["hidden_size"] * 3)
        self.dense = nn.Linear(vision["hidden_size"], vision["hidden_size"])
        self.output_dropout = nn.Dropout(vision["dropout_prob"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, _ = x.shape
        # Published layout: qkv.reshape(B, L, 3, heads, head_dim), i.e. [q | k | v] blocks of whole heads.
        q, k, v = self.query_key_value(x).view(batch, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # default scale head_dim ** -0.5, as the original
        return self.output_dropout(self.dense(out.transpose(1, 2).reshape(batch, length, -1)))


class EVA2CLIPMLP(nn.Module):
    def __init__(self, vision: dict):
        super().__init__()
        self.fc1 = nn.Linear(vision["hidden_size"], vision["intermediate_size"])
        self.fc2 = nn.Linear(vision["intermediate_size"], vision["hidden_size"])
        self.activation_fn = ACT2FN[vision["hidden_act"]]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation_fn(self.fc1(x)))


class EVA2CLIPLayer(GradientCheckpointingLayer):
    """EVA2-CLIP block with *post-sublayer* norms: x + LN(attn(x)), then x + LN(mlp(x)) (not pre-norm)."""

    def __init__(self, vision: dict):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(vision["hidden_size"], eps=vision["layer_norm_eps"])
        self.attention = EVA2CLIPAttention(vision)
        self.mlp = EVA2CLIPMLP(vision)
        self.post_attention_layernorm = nn.LayerNorm(vision["hidden_size"], eps=vision["layer_norm_eps"])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.input_layernorm(self.attention(hidden_states))
        return hidden_states + self.post_attention_layernorm(self.mlp(hidden_states))


class EVA2CLIPTransformer(nn.Module):
    def __init__(self, vision: dict):
        super().__init__()
        self.layers = nn.ModuleList([EVA2CLIPLayer(vision) for _ in range(vision["num_hidden_layers"])])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            hidden_states = layer(hidden_states)
        return hidden_states


class CogVLMVisionGLU(nn.Module):
    """Adapter into the decoder width: linear_proj -> LayerNorm -> GELU -> SiLU-gated MLP, all without biases."""

    def __init__(self, config: CogVLMConfig, in_features: int):
        super().__init__()
        self.linear_proj = nn.Linear(in_features, config.hidden_size, bias=False)
        self.norm1 = nn.LayerNorm(config.hidden_size)  # default eps 1e-5, as published
        self.act1 = nn.GELU()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class CogVLMVisionModel(nn.Module):
    """images [N, 3, S, S] -> image-token embeddings [N, config.num_image_tokens, hidden] = [boi, patches, eoi]."""

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        vision = config.vision_config
        self.patch_embedding = EVA2CLIPPatchEmbedding(vision)
        self.transformer = EVA2CLIPTransformer(vision)
        self.linear_proj = CogVLMVisionGLU(config, in_features=vision["hidden_size"])
        if config.vision_downsample:
            # CogVLM2 visual.py: Conv2d(vision hidden, vision hidden, 2, stride 2) on the patch grid, so 1344 px
            # -> 96x96 patches -> 48x48 = 2304 image tokens.
            self.conv = nn.Conv2d(vision["hidden_size"], vision["hidden_size"], kernel_size=2, stride=2)
        self.boi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.eoi = nn.Parameter(torch.zeros(1, 1, config.hidden_size))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.transformer(self.patch_embedding(images))[:, 1:]  # the CLS token is dropped
        if hasattr(self, "conv"):
            batch, length, width = x.shape
            grid = int(length**0.5)
            x = self.conv(x.transpose(1, 2).reshape(batch, width, grid, grid)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        return torch.cat((self.boi.expand(x.shape[0], -1, -1), x, self.eoi.expand(x.shape[0], -1, -1)), dim=1)
