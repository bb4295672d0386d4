"""The models of the GPU table (`bench/gpu_table.py`): each builds its family at the real size with random weights
(or small, for CPU tests), the inputs of one cached training step, and the analytic FLOPs of one forward of its
network, which `tests/test_gpu_table.py` checks against `torch.utils.flop_counter.FlopCounterMode`.

FLOPs count matmuls, convolutions and attention (QK^T and AV, `4 N^2 d` for N tokens of width d, masked or not), as
FlopCounterMode does; norms and elementwise ops are left out. A linear layer of n tokens costs `2 n in out`; LoRA of
rank r on it adds `2 n r (in + out)`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cogvideox_step import REAL, real_family  # noqa: E402


def _lora(n: float, d_in: int, d_out: int, rank: int) -> float:
    return 2 * n * rank * (d_in + d_out)


class CogVideoXBench:
    """CogVideoX-2B/5B and 1.5-5B (bench/cogvideox_step.py's published transformer configs), T5 embeddings of 226
    tokens and VAE latents of `frames x height x width`."""

    small = dict(frames=17, height=32, width=32)

    def __init__(self, size: str, frames: int, height: int, width: int):
        self.size, self.frames, self.height, self.width = size, frames, height, width

    @property
    def resolution(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"

    def build(self, device: str, dtype: torch.dtype, layers: int | None = None):
        if layers is None:
            return real_family(self.size, dtype, device, self.height, self.width, self.frames)
        saved = dict(REAL[self.size])
        REAL[self.size] = {**saved, "num_layers": layers}
        try:
            return real_family(self.size, dtype, device, self.height, self.width, self.frames)
        finally:
            REAL[self.size] = saved

    def inputs(self, family, device: str, dtype: torch.dtype) -> dict:
        cfg = family.transformer.config
        latent = (1, cfg.in_channels, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8)
        return {"latent_mean": _random(latent, device, dtype),
                "latent_logvar": torch.full(latent, -10.0, device=device, dtype=dtype),
                "prompt_embeds": torch.zeros(1, cfg.max_text_seq_length, cfg.text_embed_dim, device=device,
                                             dtype=dtype)}

    def tokens(self, cfg) -> tuple[int, int]:
        """(video tokens, text tokens) of one sample."""
        latent_frames = (self.frames - 1) // 4 + 1
        p_t = cfg.patch_size_t or 1
        latent_frames += (-latent_frames) % p_t  # 1.5 pads an odd count with the first frame
        video = latent_frames // p_t * (self.height // 8 // cfg.patch_size) * (self.width // 8 // cfg.patch_size)
        return video, cfg.max_text_seq_length

    def forward_flops(self, family, lora_rank: int = 0) -> dict[str, float]:
        """Per block `24 N d^2` (q, k, v, out and the 4x MLP), `16 N d r` for LoRA on q, k, v, out, two
        LayerNormZero heads; `4 N^2 d` attention; plus embeddings and the output head."""
        cfg = family.transformer.config
        video, text = self.tokens(cfg)
        n = video + text
        d = cfg.num_attention_heads * cfg.attention_head_dim
        temb, p, p_t = cfg.time_embed_dim, cfg.patch_size, cfg.patch_size_t or 1
        per_block = 24 * n * d * d + 4 * _lora(n, d, d, lora_rank) + 2 * (2 * temb * 6 * d)
        outside = (2 * video * cfg.in_channels * p * p * p_t * d  # patch embedding
                   + 2 * text * cfg.text_embed_dim * d  # text projection
                   + 2 * (d * temb + temb * temb)  # timestep embedding MLP
                   + 2 * temb * 2 * d  # final AdaLayerNorm
                   + 2 * video * d * p * p * p_t * cfg.out_channels)  # output projection
        return _totals(cfg.num_layers * per_block + outside, cfg.num_layers * 4 * n * n * d)

    def forward(self, family, encoded: dict):
        x0 = family.sample_latents(encoded)
        return family.transformer(hidden_states=x0, encoder_hidden_states=encoded["prompt_embeds"],
                                  timestep=torch.zeros(1, dtype=torch.long, device=x0.device),
                                  image_rotary_emb=family.rotary_embeddings(x0), return_dict=False)


# THUDM/CogView4-6B transformer/config.json: the settings of diffusers' convert_cogview4_to_diffusers_megatron.py
# (the script that made the checkpoint), the rest at the class defaults (rope_axes_dim (256, 256), sample_size 128).
COGVIEW4_6B = dict(patch_size=2, in_channels=16, out_channels=16, num_layers=28, attention_head_dim=128,
                   num_attention_heads=32, text_embed_dim=4096, time_embed_dim=512, condition_dim=256,
                   pos_embed_max_size=128)
# its VAE (same script): AutoencoderKL, 16 latent channels, 8x, scaling_factor 1.0, no quant convs
COGVIEW4_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 512, 1024, 1024),
                    layers_per_block=3, act_fn="silu", latent_channels=16, norm_num_groups=32, sample_size=1024,
                    scaling_factor=1.0, shift_factor=0.0, force_upcast=True, use_quant_conv=False,
                    use_post_quant_conv=False, mid_block_add_attention=False)


class CogView4Bench:
    """CogView4-6B at `height x width` with GLM embeddings of `text_tokens` (a caption padded to a multiple of 16, as
    the pipeline encodes it). The GLM-4 text encoder is not run (embeddings are cached): a one-layer stand-in."""

    small = dict(height=64, width=64, text_tokens=16)

    def __init__(self, height: int, width: int, text_tokens: int):
        self.height, self.width, self.text_tokens = height, width, text_tokens

    @property
    def resolution(self) -> str:
        return f"{self.height}x{self.width}"

    def build(self, device: str, dtype: torch.dtype, layers: int | None = None):
        from diffusers import (AutoencoderKL, CogView4Pipeline, CogView4Transformer2DModel,
                               FlowMatchEulerDiscreteScheduler)
        from transformers import GlmConfig, GlmModel

        from recipes.cogview.cogview4 import CogView4
        from recipes.cogview.cogview4_tiny import SCHEDULER

        with torch.device(device):
            transformer = CogView4Transformer2DModel(**{**COGVIEW4_6B, **(dict(_SMALL_TRANSFORMER, num_layers=layers)
                                                                           if layers else {})})
            vae = AutoencoderKL(**({**COGVIEW4_VAE, **_SMALL_VAE} if layers else COGVIEW4_VAE))
            text_encoder = GlmModel(GlmConfig(vocab_size=32, hidden_size=4096, intermediate_size=8, num_hidden_layers=1,
                                              num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                                              pad_token_id=0, eos_token_id=1))
        pipe = CogView4Pipeline(tokenizer=None, text_encoder=text_encoder.to(dtype), vae=vae.to(dtype),
                                transformer=transformer.to(dtype),
                                scheduler=FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER))
        return CogView4(path="random-6b", height=self.height, width=self.width, pipeline=pipe)

    def inputs(self, family, device: str, dtype: torch.dtype) -> dict:
        latent = (1, 16, self.height // 8, self.width // 8)
        return {"latent_mean": _random(latent, device, dtype),
                "latent_logvar": torch.full(latent, -10.0, device=device, dtype=dtype),
                "prompt_embeds": torch.zeros(1, self.text_tokens, 4096, device=device, dtype=dtype),
                "prompt_length": torch.full((1,), self.text_tokens, device="cpu" if device == "meta" else device)}

    def tokens(self, cfg) -> tuple[int, int]:
        p = cfg.patch_size
        return (self.height // 8 // p) * (self.width // 8 // p), self.text_tokens

    def forward_flops(self, family, lora_rank: int = 0) -> dict[str, float]:
        """Per block `24 N d^2` (q, k, v, out and the 4x MLP on image and text tokens), `16 N d r` for LoRA on q, k,
        v, out, the AdaLayerNormZero head (temb -> 12 d); `4 N^2 d` attention; plus the patch and text projections,
        the timestep and size-condition MLPs, the final AdaLayerNorm and the output projection."""
        cfg = family.transformer.config
        image, text = self.tokens(cfg)
        n = image + text
        d = cfg.num_attention_heads * cfg.attention_head_dim
        temb, p, cond = cfg.time_embed_dim, cfg.patch_size, cfg.condition_dim
        per_block = 24 * n * d * d + 4 * _lora(n, d, d, lora_rank) + 2 * temb * 12 * d
        outside = (2 * image * cfg.in_channels * p * p * d  # patch projection
                   + 2 * text * cfg.text_embed_dim * d  # text projection
                   + 2 * (d * temb + temb * temb)  # timestep MLP (sinusoid of width d -> temb -> temb)
                   + 2 * (6 * cond * temb + temb * temb)  # size conditions (3 x 2 sinusoids -> temb -> temb)
                   + 2 * temb * 2 * d  # final AdaLayerNorm
                   + 2 * image * d * p * p * cfg.out_channels)  # output projection
        return _totals(cfg.num_layers * per_block + outside, cfg.num_layers * 4 * n * n * d)

    def forward(self, family, encoded: dict):
        x0 = family.sample_latents(encoded)
        sizes = torch.tensor([[self.height, self.width]], dtype=x0.dtype, device=x0.device)
        return family.transformer(hidden_states=x0, encoder_hidden_states=encoded["prompt_embeds"],
                                  timestep=torch.zeros(1, dtype=torch.long, device=x0.device), original_size=sizes,
                                  target_size=sizes, crop_coords=torch.zeros_like(sizes), return_dict=False)


# With a few blocks (CPU tests) the transformer is also narrow, and the VAE (not run: latents are cached) too.
_SMALL_TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=32, rope_axes_dim=(32, 32))
_SMALL_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4)


class CogVLMBench:
    """The CogVLM captcha LoRA (conf/recipe/cogvlm_captcha_lora.yaml) on CogVLM-17B (bench/cogvlm_memory.py's
    cogvlm-base-490-hf config): one 490x490 image (1227 image tokens) and `text_tokens` text tokens (the prompt
    "CAPTCHA:", a 6-character label and EOS, about 12 Vicuna tokens), the loss on the last `label_tokens`.

    `small`: a few-layer model at small, all-different widths, on which the analytic count is checked against
    FlopCounterMode on the CPU (the experts route tokens by a data-dependent mask, which the meta device cannot
    run)."""

    small = dict(text_tokens=12, label_tokens=7, small_model=True)

    def __init__(self, text_tokens: int, label_tokens: int, small_model: bool = False):
        self.text_tokens, self.label_tokens, self.small_model = text_tokens, label_tokens, small_model

    @property
    def resolution(self) -> str:
        return f"{self.config().vision_config['image_size']}px"

    def config(self, layers: int | None = None):
        from cogvlm_memory import COGVLM_17B

        from recipes.cogvlm import CogVLMConfig

        if not self.small_model:
            vision = dict(COGVLM_17B["vision_config"])
            return CogVLMConfig(**{**COGVLM_17B, "vision_config": vision,
                                   **({"num_hidden_layers": layers} if layers else {})})
        vision = dict(hidden_size=48, intermediate_size=80, num_hidden_layers=layers or 2, num_heads=4,
                      image_size=56, patch_size=14, num_positions=17, in_channels=3, layer_norm_eps=1e-6,
                      hidden_act="gelu", dropout_prob=0.0)
        return CogVLMConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers or 2, num_attention_heads=4,
                            vocab_size=120, template_version="base", vision_config=vision)

    @property
    def trained_modules(self) -> list[str]:
        """The ViT MLPs the recipe trains fully (layers 46-54 of 63; the last one of the small model)."""
        layers = self.config().vision_config["num_hidden_layers"]
        return ([f"vision.transformer.layers.{i}.mlp" for i in range(46, 55)] if layers > 54
                else [f"vision.transformer.layers.{layers - 1}.mlp"])

    def build(self, device: str, dtype: torch.dtype, layers: int | None = None):
        from recipes.cogvlm import CogVLMForCausalLM
        from recipes.cogvlm.family import CogVLM, lora_target_modules

        class RandomCogVLM(CogVLM):
            """The family's objective and hooks on a model built in memory (`CogVLM.__init__` loads a checkpoint and
            its tokenizer, which random weights have not)."""

            def __init__(self, model):
                torch.nn.Module.__init__(self)
                self.lora_target_modules = lora_target_modules(("language_expert_attention", "vit_attention"))
                self.path, self.max_new_tokens, self.weight_dtype, self.tokenizer = "random", 10, dtype, None
                self.model = model
                self.model.requires_grad_(False)

        with torch.device(device):
            model = CogVLMForCausalLM(self.config(layers)).to(dtype)
        return RandomCogVLM(model)

    def inputs(self, family, device: str, dtype: torch.dtype) -> dict:
        """`[bos] + image tokens (type 1) + text (type 0)`, as `recipes.cogvlm.prompting` builds a training sample."""
        cfg = family.model.config
        image_tokens, size = cfg.num_image_tokens, cfg.vision_config["image_size"]
        length = 1 + image_tokens + self.text_tokens
        g = torch.Generator().manual_seed(0)
        input_ids = torch.randint(3, cfg.vocab_size, (1, length), generator=g)
        input_ids[0, 0], input_ids[0, 1: 1 + image_tokens] = 1, 0  # bos, image placeholders
        token_types = torch.zeros(1, length, dtype=torch.long)
        token_types[0, 1: 1 + image_tokens] = 1
        labels = torch.full((1, length), -100)
        labels[0, -self.label_tokens:] = input_ids[0, -self.label_tokens:]
        return {"input_ids": input_ids.to(device), "token_type_ids": token_types.to(device),
                "attention_mask": torch.ones(1, length, dtype=torch.long, device=device), "labels": labels.to(device),
                "images": _random((1, 3, size, size), device, dtype)}

    def tokens(self, cfg) -> tuple[int, int]:
        """(image tokens, text tokens incl. BOS) of the decoder's sequence."""
        return cfg.num_image_tokens, self.text_tokens + 1

    def forward_flops(self, family, lora_rank: int = 0) -> dict[str, float]:
        """ViT (patches + CLS): per layer `8 N h^2 + 4 N h i` and `4 N^2 h`, LoRA on its QKV and dense; the GLU
        adapter on the patches; decoder: per layer QKV, dense and the gated MLP of the token's expert, `4 N^2 d`
        attention (causal, counted whole), LoRA on the language expert's QKV and dense (BOS, eoi and the text);
        the LM head over every position. `trained_linear`: the forward FLOPs of the fully trained ViT MLPs."""
        cfg = family.model.config
        vision = cfg.vision_config
        h, hi, patch = vision["hidden_size"], vision["intermediate_size"], vision["patch_size"]
        patches = (vision["image_size"] // patch) ** 2
        nv = patches + 1
        vit_layer = 2 * nv * h * (3 * h + h + 2 * hi) + _lora(nv, h, 3 * h, lora_rank) + _lora(nv, h, h, lora_rank)
        d, i = cfg.hidden_size, cfg.intermediate_size
        glu = 2 * patches * h * d + 2 * patches * 3 * d * i
        image, text = self.tokens(cfg)
        n = image + text
        language = n - (image - 1)  # boi and the patches go to the vision expert, eoi and the text to the language one
        qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        decoder_layer = (2 * n * d * (qkv + d) + 2 * n * 3 * d * i + _lora(language, d, qkv, lora_rank)
                         + _lora(language, d, d, lora_rank))
        linear = (2 * patches * 3 * patch * patch * h + vision["num_hidden_layers"] * vit_layer + glu
                  + cfg.num_hidden_layers * decoder_layer + 2 * n * d * cfg.vocab_size)
        attention = vision["num_hidden_layers"] * 4 * nv * nv * h + cfg.num_hidden_layers * 4 * n * n * d
        # the fully trained ViT MLPs' share of `linear` (their weights get gradients too)
        return {**_totals(linear, attention), "trained_linear": len(self.trained_modules) * 2 * nv * 2 * h * hi}

    def forward(self, family, encoded: dict):
        return family.model(**{k: v for k, v in encoded.items() if k != "labels"})


def _totals(linear: float, attention: float) -> dict[str, float]:
    return {"linear": linear, "attention": attention, "forward": linear + attention}


def _random(shape: tuple, device: str, dtype: torch.dtype) -> torch.Tensor:
    if device == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
