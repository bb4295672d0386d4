"""CogView4 text-to-image: loading, the flow-matching objective, padded-prompt masking, sampling and export.

Objective (THUDM/CogKit `finetune/diffusion/models/cogview/cogview4/lora_trainer.py`; docs/objectives.md#cogview4):
`sigma ~ U(0, 1)`, shifted by the resolution-dependent `mu = sqrt(image_seq_len / 256) * 0.75 + 0.25` to
`sigma' = mu / (mu + (1 / sigma - 1))`; `x_t = (1 - sigma') x0 + sigma' eps`; the transformer predicts the
velocity `eps - x0` and the loss is its MSE. The timestep the transformer sees is the *unshifted*
`sigma * 1000`, as the installed `CogView4Pipeline` feeds it at inference (pinned by a test that records the
pipeline's calls). Size conditioning: `original_size = target_size = (H, W)`, `crop_coords = (0, 0)`.

Prompts (CogKit issue #39, diffusers #13621): the pipeline encodes a prompt left-padded to a multiple of 16
tokens, and diffusers' `CogView4AttnProcessor` masks nothing (its 0/1 float mask is *added* to the logits).
Training therefore encodes each prompt alone at its own padded length (exactly as inference does), pads the
embeddings of a batch to its longest, and hides the extra positions from attention with a boolean key mask
in `MaskedCogView4AttnProcessor`, so every sample gets the loss it would get alone.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from finetune.data import DataError, ImageSpec, Processor, TextLimit
from finetune.family import GenerationRequest, Sample, parse_dtype
from finetune.hub import resolve_pretrained
from finetune.lora_formats.files import query_widths
from recipes.diffusion.pipeline import DiffusersFamily, base_quantization, load_pipeline
from recipes.diffusion.objectives import FlowMatching, sample_latents


class MaskedCogView4AttnProcessor:
    """diffusers' `CogView4AttnProcessor` with a working text mask.

    `attention_mask`: bool [B, text_len], True for real text positions. Masked positions are removed as
    *keys* only (a query row always keeps the image tokens, so no row is all -inf and nothing turns NaN);
    their own outputs are discarded by every later layer for the same reason. With no mask the computation
    is the stock processor's, so inference through the pipeline is unchanged.
    """

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        dtype = encoder_hidden_states.dtype
        batch, text_len, _ = encoder_hidden_states.shape
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        query, key, value = (proj(hidden_states).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                             for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query).to(dtype=dtype)
        if attn.norm_k is not None:
            key = attn.norm_k(key).to(dtype=dtype)
        if image_rotary_emb is not None:  # rotary positions on the image tokens only (text has none)
            query[:, :, text_len:] = apply_rotary_emb(query[:, :, text_len:], image_rotary_emb, use_real_unbind_dim=-2)
            key[:, :, text_len:] = apply_rotary_emb(key[:, :, text_len:], image_rotary_emb, use_real_unbind_dim=-2)
        mask = None
        if attention_mask is not None:
            keep = torch.ones(batch, hidden_states.shape[1], dtype=torch.bool, device=query.device)
            keep[:, :text_len] = attention_mask.to(device=query.device, dtype=torch.bool)
            mask = keep[:, None, None, :]  # broadcast over heads and queries: a key mask
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, image_out = out.split([text_len, out.shape[1] - text_len], dim=1)
        return image_out, encoder_out


def install_masked_attention(transformer: nn.Module) -> None:
    for block in transformer.transformer_blocks:
        block.attn1.set_processor(MaskedCogView4AttnProcessor())


def round_up(value: int, multiple: int = 16) -> int:
    return -(-value // multiple) * multiple


def check_sides(family: str, multiple: int, **sides: int) -> None:
    for name, value in sides.items():
        if value % multiple:
            raise DataError(f"model.{name}={value}: {family} needs multiples of {multiple} (VAE 8x, 2x2 patches, "
                            f"RoPE grid); use {value - value % multiple or multiple}.")


class BucketedImageFamily(DiffusersFamily):
    """A text-to-image family trained in aspect buckets within the sizes the model generates (CogView4 and
    CogView3-Plus: sides multiples of 32 in 512..2048, at most 2^21 pixels; docs/models.md#checkpoints-and-their-limits)."""

    #: the model's name in error messages
    display_name = "CogView4"
    #: the text encoder, named in the data report's long-caption count
    text_encoder_name = "GLM"

    @classmethod
    def data_processor(cls, height: int = 1024, width: int = 1024, bucket_pixels: int = 1024 * 1024,
                       min_side: int = 512, max_side: int = 2048, bucket_multiple: int = 32,
                       max_pixels: int = 2**21, checkpoint: str | None = None,
                       max_sequence_length: int | None = None) -> Processor:
        check_sides(cls.display_name, bucket_multiple, height=height, width=width, min_side=min_side,
                    max_side=max_side)
        # the text encoder's tokens the pipeline keeps (`max_sequence_length`), for the data report
        limit = (TextLimit(cls.text_encoder_name, max_sequence_length, Path(checkpoint) / "tokenizer")
                 if checkpoint and max_sequence_length else None)
        return Processor(ImageSpec(pixels=bucket_pixels, min_side=min_side, max_side=max_side,
                                   multiple=bucket_multiple, max_pixels=max_pixels), text_limit=limit)


class CogView4(BucketedImageFamily):
    """CogView4-6B text-to-image (Chinese and English prompts).

    Args:
        path: hub id (THUDM/CogView4-6B), a local diffusers checkpoint, or `tiny`.
        dtype: weights of the frozen parts and the base transformer (CogView4 was trained in bf16);
            trainable parameters are always kept in fp32.
        height, width: size of the validation samples (training sizes come from the data's buckets).
        max_sequence_length: GLM tokens kept per prompt (the pipeline's limit is 1024). Embeddings are
            stored padded to this length (rounded up to 16) in the encoded cache: `length x 4096 x 2` bytes per
            sample in bf16 (8 MiB at 1024); lower it if captions are short.
        sigma_sampling: `uniform` (CogKit: t ~ U{0..999}) or `logit_normal` (SD3; more weight mid-noise).
        logit_mean, logit_std: the logit-normal density's parameters.
        loss_weighting: `none` (CogKit: plain MSE) or `cosmap` (SD3's weighting on the shifted sigma).
        bucket_pixels: the training buckets' area (1024^2: the native size); more pixels, more detail and memory.
        min_side, max_side, bucket_multiple, max_pixels: the sizes the model generates (512..2048, multiples of
            32, at most 2^21 pixels); the buckets stay within them.
        quantize_base: null, or nf4 for QLoRA: the transformer's linear layers stored in 4 bits (bitsandbytes; CUDA,
            LoRA only, `base_quantization` in recipes/diffusion/pipeline.py).
        pipeline: an already built `CogView4Pipeline` to wrap instead of loading `path` (benchmarks with random
            real-size weights, `bench/gpu_models.py`).
        checkpoint: the local folder of `path` when the caller resolved it already (`finetune.run.build` does, once);
            None: resolved here (`local_checkpoint`).
    """

    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    prompt_keys = ("prompt_embeds", "prompt_length")  # what `encode` makes of the prompt (caption dropout)
    block_class_names = ("CogView4TransformerBlock",)  # what fsdp2 shards and block swap streams
    transformer_class = "CogView4Transformer2DModel"
    base_family = "CogView4"
    setting_ranges = {"height": ">0", "width": ">0", "max_sequence_length": ">=1", "logit_std": ">0",
                      "bucket_pixels": ">0", "min_side": ">0", "max_side": ">0", "bucket_multiple": ">=1",
                      "max_pixels": ">0"}  # checked by finetune.settings.check before anything is built

    @classmethod
    def recognize_lora(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """CogView4's time embedding by name, else its hidden size (4096: 32 heads x 128); a fully trained patch
        embedding of other than 16 x 2 x 2 inputs is another model's (CogView4 control's 128)."""
        if any(key.endswith("patch_embed.proj.weight") and shape[-1] != 64 for key, shape in shapes.items()):
            return None
        if any("time_condition_embed" in key for key in shapes):
            return "CogView4-6B"
        return "CogView4-6B" if query_widths(shapes) == {4096} else None

    def __init__(self, path: str = "THUDM/CogView4-6B", dtype: str = "bf16", height: int = 1024,
                 width: int = 1024, max_sequence_length: int = 1024, sigma_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, loss_weighting: str = "none",
                 bucket_pixels: int = 1024 * 1024, min_side: int = 512, max_side: int = 2048,
                 bucket_multiple: int = 32, max_pixels: int = 2**21, quantize_base: str | None = None,
                 pipeline=None, checkpoint: str | None = None):
        super().__init__()
        from diffusers import FlowMatchEulerDiscreteScheduler

        self.data_processor(height=height, width=width, bucket_pixels=bucket_pixels, min_side=min_side,
                            max_side=max_side, bucket_multiple=bucket_multiple, max_pixels=max_pixels)
        quantization = base_quantization(quantize_base, parse_dtype(dtype))
        self.path, self.dtype_name = path, dtype
        self.height, self.width, self.max_sequence_length = height, width, max_sequence_length
        self.text_pad_length = round_up(max_sequence_length)
        if pipeline is None:
            self.checkpoint_dir = checkpoint or self.local_checkpoint(path)
            pipeline = load_pipeline("CogView4Pipeline", self.checkpoint_dir, parse_dtype(dtype), quantization)
        self.attach_pipeline(pipeline)
        install_masked_attention(self.transformer)
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(self.pipeline.scheduler.config)
        # the transformer is told the unshifted sigma * 1000, as CogView4Pipeline (diffusers 0.42.1) does
        self.flow = FlowMatching(self.scheduler, sigma_sampling, logit_mean, logit_std, loss_weighting,
                                 timestep_shifted=False)
        shift_factor = self.component_config("vae").shift_factor
        if shift_factor not in (None, 0, 0.0):
            raise ValueError(f"{self.checkpoint_dir or path}: vae.config.shift_factor={shift_factor}, "
                             f"but CogView4Pipeline decodes latents / scaling_factor without a shift; training would "
                             f"not match inference.")

    @classmethod
    def local_checkpoint(cls, path: str, weights: bool = True) -> str:
        """The local folder of `path` (hub id, folder, or `tiny`: built once into the kit cache); `weights=False`:
        a hub id's configs and tokenizers only (`finetune.hub.resolve_pretrained`)."""
        from recipes.cogview.cogview4_tiny import save_tiny_cogview4

        return resolve_pretrained(path, family="cogview4", build_tiny=save_tiny_cogview4, weights=weights)

    def cache_namespace(self) -> str:
        return f"cogview4|{self.path}|encoders={self.encoder_files()}|{self.dtype_name}|text{self.max_sequence_length}"

    # -- frozen encoders ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """`batch["image"]`: [B, 3, H, W] in [-1, 1] (one bucket). Returns the VAE posterior (mean and
        logvar, so a cache still draws fresh latents) and the GLM embeddings of each prompt at its own
        padded length, right-padded with zeros to `text_pad_length`, with `prompt_length`."""
        image = batch["image"].to(self.vae.device, self.vae.dtype)
        posterior = self.vae.encode(image).latent_dist
        device = self.text_encoder.device
        embeds = torch.zeros(len(batch["prompt"]), self.text_pad_length, self.text_encoder.config.hidden_size,
                             dtype=self.text_encoder.dtype, device=device)
        lengths = torch.zeros(len(batch["prompt"]), dtype=torch.long, device=device)
        for i, prompt in enumerate(batch["prompt"]):
            # One prompt at a time: the inference pipeline's own encoder, so the left padding (and the
            # unmasked GLM attention over it) is exactly what a single-prompt `pipe(prompt)` computes.
            emb = self.pipeline._get_glm_embeds([prompt], self.max_sequence_length, device, self.text_encoder.dtype)[0]
            embeds[i, : emb.shape[0]] = emb
            lengths[i] = emb.shape[0]
        return {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar,
                "prompt_embeds": embeds, "prompt_length": lengths}

    # -- objective ------------------------------------------------------------------------------
    def sample_latents(self, encoded: dict) -> torch.Tensor:
        """`latent_dist.sample() * scaling_factor` (the pipeline decodes `latents / scaling_factor`)."""
        return sample_latents(encoded, self.component_config("vae").scaling_factor)

    def shift_mu(self, height: int, width: int) -> float:
        """The pipeline's own `calculate_shift` on `image_seq_len = (H/8)(W/8)/patch^2`."""
        from diffusers.pipelines.cogview4.pipeline_cogview4 import calculate_shift

        scale, patch = self.pipeline.vae_scale_factor, self.transformer.config.patch_size
        image_seq_len = (height // scale) * (width // scale) // patch**2
        cfg = self.scheduler.config
        return calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("base_shift", 0.25),
                               cfg.get("max_shift", 0.75))

    def text_inputs(self, encoded: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings trimmed to the batch's longest prompt and the key mask (None when nothing is padded)."""
        lengths = encoded["prompt_length"].long()
        longest = int(lengths.max())
        embeds = encoded["prompt_embeds"][:, :longest]
        mask = torch.arange(longest, device=lengths.device)[None, :] < lengths[:, None]
        return embeds, (None if bool(mask.all()) else mask)

    def transformer_input(self, x_t: torch.Tensor, encoded: dict) -> torch.Tensor:
        """The transformer's `hidden_states` at the noisy latents `x_t`: `x_t` itself (a control family concatenates
        its control latents on channels, `recipes/cogview/cogview4_control.py`)."""
        return x_t

    def per_sample_loss(self, encoded: dict, noise: torch.Tensor | None = None, sigmas: torch.Tensor | None = None,
                        x0: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.sample_latents(encoded) if x0 is None else x0
        batch, _, h, w = x0.shape
        height, width = h * self.pipeline.vae_scale_factor, w * self.pipeline.vae_scale_factor
        embeds, mask = self.text_inputs(encoded)
        dtype = self.transformer_dtype
        sizes = torch.tensor([[height, width]] * batch, dtype=dtype, device=x0.device)

        def predict(x_t, timestep):
            return self.transformer(
                hidden_states=self.transformer_input(x_t, encoded).to(dtype), encoder_hidden_states=embeds.to(dtype),
                timestep=timestep,
                original_size=sizes, target_size=sizes, crop_coords=torch.zeros_like(sizes), attention_mask=mask,
                return_dict=False)[0]

        return self.flow.per_sample_loss(predict, x0, self.shift_mu(height, width), noise=noise, sigmas=sigmas)

    def training_loss(self, encoded: dict, noise: torch.Tensor | None = None,
                      sigmas: torch.Tensor | None = None) -> torch.Tensor:
        return self.per_sample_loss(encoded, noise=noise, sigmas=sigmas).mean()

    # -- sampling -------------------------------------------------------------------------------
    def generate_one(self, request: GenerationRequest, generator: torch.Generator, num_inference_steps: int = 50,
                     guidance_scale: float = 3.5) -> Sample:
        return self.generate_image(request, generator, num_inference_steps, guidance_scale)
