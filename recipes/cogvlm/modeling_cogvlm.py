"""Native CogVLM / CogVLM2 for transformers (no `trust_remote_code`).

Written from the published architecture (THUDM/cogvlm-chat-hf and THUDM/cogvlm2-llama3-chat-19B
`modeling_cogvlm.py` / `visual.py`; docs/cogvlm.md#architecture): a LLaMA decoder whose attention QKV and
output projections and whose MLP exist twice, a language expert and a vision expert, chosen per token from
`token_type_ids` (0 language, 1 vision). The parameter names are those of the published checkpoints, so
`CogVLMForCausalLM.from_pretrained` reads their sharded safetensors without any renaming.

The KV cache is transformers' `DynamicCache` (`CogVLMKVCache` adds the next position id of every sample, because
CogVLM positions are not token indices: all image patches share one position), so transformers' `generate` works
as with any causal LM (`generation_cogvlm.py` gives it the CogVLM positions and token types).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)

from .configuration_cogvlm import CogVLMConfig
from .generation_cogvlm import CogVLMGenerationMixin
from .tokens import LANGUAGE_TOKEN_TYPE, VISION_TOKEN_TYPE, build_position_ids
from .vision_cogvlm import CogVLMVisionModel, EVA2CLIPPatchEmbedding

def vision_expert_mask(token_type_ids: torch.Tensor) -> torch.Tensor:
    """Tokens routed to the vision expert: vision tokens whose next token is also a vision token.

    Published `get_expert_mask`: boi and the patches use the vision expert, eoi (followed by text) the language
    expert. The last token of a chunk always counts as language.
    """
    is_vision = token_type_ids == VISION_TOKEN_TYPE
    return is_vision & F.pad(is_vision[:, 1:], (0, 1), value=False)


def _route(x: torch.Tensor, vision_mask: torch.Tensor | None, vision_fn, language_fn) -> torch.Tensor:
    """Apply vision_fn to the tokens in vision_mask and language_fn to the others (each expert sees only its tokens).
    vision_mask None: no vision-expert token (text-only batches, every cached decoding step)."""
    if vision_mask is None:
        return language_fn(x)
    vision_out = vision_fn(x[vision_mask])
    language_out = language_fn(x[~vision_mask])
    out = vision_out.new_empty(*x.shape[:-1], vision_out.shape[-1])
    out[vision_mask] = vision_out
    out[~vision_mask] = language_out
    return out


class CogVLMRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)


class CogVLMRotaryEmbedding(nn.Module):
    """GPT-NeoX style (non-interleaved, rotate_half) rotary embedding, as the published FastRotaryEmbedding with
    interleaved=False, from explicit position ids.

    The frequencies and angles stay float32 whatever the model's dtype, as in transformers' own rotary classes: a
    bf16 `inv_freq` (what `model.to(torch.bfloat16)` makes of a float buffer) moves the angles by up to
    position * 2**-9 rad, far beyond bf16's resolution of cos/sin. Only the finished cos/sin tables are cast.
    """

    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.base = float(config.rope_theta)
        # Not a weight: recomputed from the config, never saved (no `rotary_emb.inv_freq` in the checkpoints).
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self, device=None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        return 1.0 / (self.base**exponents)

    def _apply(self, fn, recurse: bool = True):
        # `.to(dtype)`, `.half()`, `.bfloat16()` cast every float buffer: recompute this one in float32 afterwards.
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = self.compute_inv_freq(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32:  # set from outside (e.g. a buffer copied in another dtype)
            inv_freq = self.compute_inv_freq(position_ids.device)
        with torch.autocast(device_type=position_ids.device.type, enabled=False):  # no bf16 angles under autocast
            angles = position_ids[..., None].float() * inv_freq.to(position_ids.device)  # [B, L, head_dim / 2]
            angles = torch.cat((angles, angles), dim=-1)[:, None]  # [B, 1, L, head_dim]
            return angles.cos().to(dtype), angles.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class CogVLMMLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class CogVLMExpertMLP(nn.Module):
    def __init__(self, config: CogVLMConfig):
        super().__init__()
        self.language_mlp = CogVLMMLP(config)
        if config.vision_experts:  # CogVLM2-Video has none (CogVLMConfig.vision_experts)
            self.vision_mlp = CogVLMMLP(config)

    def forward(self, x: torch.Tensor, vision_mask: torch.Tensor) -> torch.Tensor:
        return _route(x, vision_mask, getattr(self, "vision_mlp", None), self.language_mlp)


class CogVLMExpertAttention(nn.Module):
    """Causal self-attention whose QKV and output projections are chosen per token (vision or language expert)."""

    def __init__(self, config: CogVLMConfig, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        # Fused [q | k | v] rows: hidden + 2 * kv_heads * head_dim (12288 for CogVLM1, 6144 for CogVLM2's GQA).
        qkv_size = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        hidden = config.hidden_size
        if config.vision_experts:  # CogVLM2-Video has none (CogVLMConfig.vision_experts)
            self.vision_expert_query_key_value = nn.Linear(hidden, qkv_size, bias=config.vision_expert_qkv_bias)
            self.vision_expert_dense = nn.Linear(hidden, hidden, bias=False)
        self.language_expert_query_key_value = nn.Linear(hidden, qkv_size, bias=False)
        self.language_expert_dense = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, vision_mask, cos, sin, attention_mask, past_key_values=None):
        batch, length, _ = x.shape
        qkv = _route(x, vision_mask, getattr(self, "vision_expert_query_key_value", None),
                     self.language_expert_query_key_value)
        kv_width = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([self.num_heads * self.head_dim, kv_width, kv_width], dim=-1)
        q = q.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        if past_key_values is not None:  # the cache keeps the (GQA-narrow) keys and values of earlier tokens
            k, v = past_key_values.update(k, v, self.layer_idx)
        if self.num_kv_heads != self.num_heads:  # GQA: query head h reads KV head h // group
            group = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return _route(out, vision_mask, getattr(self, "vision_expert_dense", None), self.language_expert_dense)


class CogVLMDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: CogVLMConfig, layer_idx: int = 0):
        super().__init__()
        self.self_attn = CogVLMExpertAttention(config, layer_idx)
        self.mlp = CogVLMExpertMLP(config)
        self.input_layernorm = CogVLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = CogVLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states, vision_mask, cos, sin, attention_mask, past_key_values=None):
        # `past_key_values` is a keyword so that GradientCheckpointingLayer drops it while checkpointing.
        hidden_states = hidden_states + self.self_attn(
            self.input_layernorm(hidden_states), vision_mask, cos, sin, attention_mask, past_key_values
        )
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), vision_mask)


class CogVLMKVCache(DynamicCache):
    """transformers' `DynamicCache` (per-layer keys and values [B, kv_heads, T, head_dim]) that also remembers the
    next position id of every sample [B] (`next_position_ids`), so a cached step needs no position_ids. Any
    `transformers.Cache` works as `past_key_values`; with another one, cached steps must pass position_ids (as
    `generate` does through `prepare_inputs_for_generation`)."""

    next_position_ids: torch.Tensor | None = None


def _causal_padding_mask(attention_mask: torch.Tensor, query_length: int) -> torch.Tensor:
    """Boolean [B, 1, q, k] mask (True = attend) for queries at the last query_length of k positions."""
    key_length = attention_mask.shape[1]
    key_pos = torch.arange(key_length, device=attention_mask.device)
    query_pos = key_pos[key_length - query_length :, None]
    mask = (key_pos[None] <= query_pos)[None] & attention_mask.bool()[:, None, :]
    # A padding query would see no key at all and softmax to NaN: let every token see itself.
    mask |= (key_pos[None] == query_pos)[None]
    return mask[:, None]


class CogVLMPreTrainedModel(PreTrainedModel):
    config_class = CogVLMConfig
    config: CogVLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CogVLMDecoderLayer", "EVA2CLIPLayer"]
    _skip_keys_device_placement = ["past_key_values"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, (nn.LayerNorm, CogVLMRMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, CogVLMRotaryEmbedding):
            # from_pretrained builds the model on the meta device; non-persistent buffers are filled here.
            init.copy_(module.inv_freq, module.compute_inv_freq(module.inv_freq.device))
        elif isinstance(module, EVA2CLIPPatchEmbedding):
            init.normal_(module.cls_embedding, mean=0.0, std=std)
        elif isinstance(module, CogVLMVisionModel):
            init.normal_(module.boi, mean=0.0, std=std)
            init.normal_(module.eoi, mean=0.0, std=std)


class CogVLMModel(CogVLMPreTrainedModel):
    """The `model.` part of the checkpoints: token embeddings, vision tower, expert decoder and final norm."""

    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([CogVLMDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = CogVLMRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = CogVLMRotaryEmbedding(config)
        self.vision = CogVLMVisionModel(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def embed(self, input_ids, token_type_ids, images):
        """Token embeddings with the image features written over the vision-token positions (row-major order)."""
        embeds = self.embed_tokens(input_ids)
        is_vision = token_type_ids == VISION_TOKEN_TYPE
        num_vision = int(is_vision.sum())
        if num_vision == 0:
            return embeds
        if images is None:
            raise ValueError(
                f"token_type_ids mark {num_vision} vision tokens but no images were given: pass `images` "
                "[num_images, 3, H, W] (cached decoding steps must use token type 0)."
            )
        if isinstance(images, (list, tuple)):  # the published format: one list of images per sample
            nested = [item if isinstance(item, (list, tuple)) else [item] for item in images]
            images = torch.stack([image for item in nested for image in item])
        images = images.to(device=embeds.device, dtype=self.vision.patch_embedding.proj.weight.dtype)
        features = self.vision(images)  # [N, num_image_tokens, hidden]
        if features.shape[0] * features.shape[1] != num_vision:
            raise ValueError(
                f"{features.shape[0]} images give {features.shape[0] * features.shape[1]} image tokens "
                f"({features.shape[1]} each) but token_type_ids mark {num_vision}: build the prompt with "
                f"image_token_count={self.config.num_image_tokens} per image."
            )
        return embeds.index_put((is_vision,), features.reshape(-1, features.shape[-1]).to(embeds.dtype))

    def forward(
        self,
        input_ids: torch.LongTensor,
        images: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """attention_mask covers past + new tokens (1 real, 0 padding); position_ids default to the CogVLM rule
        (prefill) or continue from a `CogVLMKVCache` (cached steps). use_cache defaults to config.use_cache in eval
        mode and to False in training, where a returned cache would only pin memory. A given cache is extended in
        place (as transformers' caches are)."""
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training
        if self.gradient_checkpointing and self.training:
            use_cache = False
        if use_cache and past_key_values is None:
            past_key_values = CogVLMKVCache()
        batch, length = input_ids.shape
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones(batch, past_length + length, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape[1] != past_length + length:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[1]} columns; it must cover the {past_length} cached "
                f"and {length} new tokens."
            )
        if position_ids is None:
            if past_length:
                next_position_ids = getattr(past_key_values, "next_position_ids", None)
                if next_position_ids is None:
                    raise ValueError("cached steps need position_ids (CogVLM positions are not token counts) or a "
                                     "CogVLMKVCache filled by this model, which remembers them.")
                steps = torch.arange(length, device=input_ids.device)
                position_ids = next_position_ids[:, None] + steps
            else:
                position_ids = build_position_ids(token_type_ids, attention_mask)

        hidden_states = self.embed(input_ids, token_type_ids, images)
        vision_mask = vision_expert_mask(token_type_ids) if self.config.vision_experts else None
        if vision_mask is not None and not bool(vision_mask.any()):  # one host sync here, not one per expert call
            vision_mask = None
        cos, sin = self.rotary_emb(position_ids, hidden_states.dtype)
        mask = _causal_padding_mask(attention_mask, length)
        for layer in self.layers:
            hidden_states = layer(hidden_states, vision_mask, cos, sin, mask, past_key_values=past_key_values)
        if past_key_values is not None:
            past_key_values.next_position_ids = position_ids[:, -1] + 1
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                       past_key_values=past_key_values if use_cache else None)


class CogVLMForCausalLM(CogVLMGenerationMixin, CogVLMPreTrainedModel):
    def __init__(self, config: CogVLMConfig):
        super().__init__(config)
        self.model = CogVLMModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def get_decoder(self):
        return self.model

    def forward(
        self,
        input_ids: torch.LongTensor,
        images: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: DynamicCache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """labels: token ids, -100 where no loss is wanted; the loss is the mean next-token cross-entropy.
        logits_to_keep > 0 computes logits for the last that many positions only (generation)."""
        outputs = self.model(
            input_ids=input_ids,
            images=images,
            token_type_ids=token_type_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, -logits_to_keep:]
        logits = self.lm_head(hidden_states).float()
        loss = None
        if labels is not None:
            if logits_to_keep:
                raise ValueError("labels need the logits of every position: leave logits_to_keep at 0.")
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),
                labels[:, 1:].reshape(-1).to(logits.device),
                ignore_index=-100,
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=outputs.past_key_values)
