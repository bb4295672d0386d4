"""Configuration of CogVLM (THUDM/cogvlm-*-hf) and CogVLM2 (THUDM/cogvlm2-llama3-*), native to this kit.

The field names are the keys of the published `config.json` files, so those files load as they are:
`THUDM/cogvlm-chat-hf` has hidden_size, intermediate_size, num_attention_heads, num_hidden_layers,
max_position_embeddings, rms_norm_eps, template_version, vocab_size, vision_config{...}, bos/eos/pad_token_id,
hidden_act, initializer_range, use_cache and tie_word_embeddings. CogVLM2's `config.json` writes its GQA width as
`num_multi_query_heads`; its other differences (rope base 500000, a bias on the vision expert's QKV, the 2x2
stride-2 `vision.conv` downsample) are hard-coded in its remote code, so they are switches here whose defaults
follow the family: CogVLM2 when `num_multi_query_heads` is present, CogVLM1 otherwise.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PretrainedConfig

# EVA2-CLIP-E of CogVLM1 (`vision_config` of THUDM/cogvlm-chat-hf and cogvlm-base-490-hf).
DEFAULT_VISION_CONFIG: dict = {
    "hidden_size": 1792,
    "intermediate_size": 15360,
    "num_hidden_layers": 63,
    "num_heads": 16,
    "image_size": 490,
    "patch_size": 14,
    "in_channels": 3,
    "num_positions": 1226,  # (490 / 14) ** 2 patches + 1 CLS
    "layer_norm_eps": 1e-6,
    "hidden_act": "gelu",
    "dropout_prob": 0.0,
}


@strict  # runs the `validate_*` methods and field type checks, as transformers' own configs do
class CogVLMConfig(PretrainedConfig):
    r"""CogVLM: a LLaMA-style decoder whose attention QKV/output and MLP have a second ("vision expert") copy used
    by image tokens, fed by an EVA2-CLIP vision tower and a GLU adapter.

    Args:
        vocab_size: tokens in the vocabulary (32000 for Vicuna-7B-v1.5, 128256 for Llama-3).
        hidden_size: decoder width; head_dim = hidden_size / num_attention_heads (128 in the real models).
        intermediate_size: SiLU-gated MLP width of both experts, and of the vision GLU adapter.
        num_hidden_layers / num_attention_heads: decoder depth and query heads.
        num_key_value_heads: KV heads (grouped-query attention); None means = num_attention_heads (CogVLM1).
        num_multi_query_heads: CogVLM2's `config.json` name for num_key_value_heads; also selects the
            CogVLM2 defaults of the switches below.
        rope_theta: rotary base; None means 10000 (CogVLM1) or 500000 (CogVLM2).
        vision_expert_qkv_bias: bias on `vision_expert_query_key_value` (CogVLM2 only); None = family default.
        vision_downsample: the 2x2 stride-2 `vision.conv` on the patch grid before the adapter (CogVLM2: 4x fewer
            image tokens); None = family default.
        vision_experts: the decoder's second ("vision expert") copy of QKV/dense/MLP. False for CogVLM2-Video and
            CogVLM2-Caption, whose published decoder has the `language_expert_*` / `language_mlp` weights only and
            runs every token, image tokens included, through them (docs/cogvlm.md#cogvlm2-caption); None = False when
            `architectures` names CogVLMVideoForCausalLM (their config.json), else True.
        template_version: default prompt template, "base", "chat" or "vqa" (see `prompting.py`).
        vision_config: EVA2-CLIP settings; missing keys take `DEFAULT_VISION_CONFIG`.
    """

    model_type = "cogvlm"
    keys_to_ignore_at_inference = ["past_key_values"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    num_multi_query_heads: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-5
    use_cache: bool = True
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    template_version: str = "chat"
    rope_theta: float | int | None = None
    vision_expert_qkv_bias: bool | None = None
    vision_downsample: bool | None = None
    vision_experts: bool | None = None
    vision_config: dict | None = None

    def __post_init__(self, **kwargs):
        is_cogvlm2 = self.num_multi_query_heads is not None
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_multi_query_heads or self.num_attention_heads
        if self.rope_theta is None:
            # CogVLM2 modeling_cogvlm.py: FastRotaryEmbedding(..., base=500000); CogVLM1 uses the default 10000.
            self.rope_theta = 500000.0 if is_cogvlm2 else 10000.0
        if self.vision_expert_qkv_bias is None:
            self.vision_expert_qkv_bias = is_cogvlm2
        if self.vision_downsample is None:
            self.vision_downsample = is_cogvlm2
        if self.vision_experts is None:
            self.vision_experts = "CogVLMVideoForCausalLM" not in (kwargs.get("architectures")
                                                                  or getattr(self, "architectures", None) or [])
        self.vision_config = {**DEFAULT_VISION_CONFIG, **(self.vision_config or {})}
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be a multiple of num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if self.template_version not in ("base", "chat", "vqa"):
            raise ValueError(f"template_version must be 'base', 'chat' or 'vqa', got {self.template_version!r}.")
        vision = self.vision_config
        grid, rest = divmod(vision["image_size"], vision["patch_size"])
        if rest or vision["num_positions"] != grid * grid + 1:
            raise ValueError(
                f"vision_config: image_size {vision['image_size']} must be a multiple of patch_size "
                f"{vision['patch_size']} and num_positions ({vision['num_positions']}) must be "
                f"(image_size / patch_size) ** 2 + 1 = {grid * grid + 1}."
            )
        if self.vision_downsample and grid % 2:
            raise ValueError(f"vision_downsample needs an even patch grid, got {grid}x{grid}.")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_image_tokens(self) -> int:
        """Tokens one image occupies in the prompt: patches (after the optional 2x2 downsample) + boi + eoi.

        (490 / 14) ** 2 + 2 = 1227 for CogVLM1-490; (1344 / 14 / 2) ** 2 + 2 = 2306 for CogVLM2.
        """
        grid = self.vision_config["image_size"] // self.vision_config["patch_size"]
        if self.vision_downsample:
            grid //= 2
        return grid * grid + 2
