"""Tiny random CogVideoX models, saved in the diffusers layouts of the THUDM checkpoints.

The real `CogVideoXPipeline` / `CogVideoXImageToVideoPipeline.from_pretrained` load them, so tests and the demo
exercise the same loading, encoding and export code as the real models. One variant per family (the family's
`family_name`, the name `resolve_pretrained` caches it under), each with what sets its checkpoint apart:

| variant | stands in for | sizes (pixels) | what differs |
|---|---|---|---|
| `cogvideox` | THUDM/CogVideoX-2b | 32x32, 9 frames -> 4x4x3 latents | rotary positions on (as 5b), 2b's scheduler |
| `cogvideox15` | THUDM/CogVideoX1.5-5B | 32x32 (to 64x64), 17 frames | `patch_size_t=2`, VAE `invert_scale_latents` |
| `cogvideox_i2v` | THUDM/CogVideoX-5b-I2V | 32x32 only, 9 frames | 32 input channels, learned positional embedding |
| `cogvideox15_i2v` | THUDM/CogVideoX1.5-5B-I2V | as `cogvideox15` | 32 input channels, `ofs` embedding |

The image-to-video variants also hold `validation_image.png`, the image `preset=tiny` validates with (the first
frame of the demo clip "a red circle moves left").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from recipes.diffusion.tiny_layout import save_diffusers_layout
from recipes.diffusion.tiny_text import tiny_t5

TINY_TEXT_DIM = 32
VALIDATION_IMAGE = "validation_image.png"

# The scheduler config shipped with THUDM/CogVideoX-2b; the 5b, 5b-I2V and 1.5 checkpoints use snr_shift_scale 1.0.
SCHEDULER_2B = {
    "_class_name": "CogVideoXDDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0,
    "timestep_spacing": "trailing",
}
SCHEDULER_5B = {**SCHEDULER_2B, "snr_shift_scale": 1.0}

# 1.5: latent frames patched in pairs, no patch bias; the rotary grid covers up to sample_height x sample_width
# latents (real: 300x300, here 8x8 = 64x64 pixels), so sizes other than the training one are possible.
TRANSFORMER_15 = {"patch_size_t": 2, "patch_bias": False, "sample_height": 8, "sample_width": 8, "sample_frames": 17}
VAE_15 = {"scaling_factor": 0.7, "invert_scale_latents": True}

# variant: (pipeline class, transformer settings, VAE settings, scheduler config)
VARIANTS = {
    "cogvideox": ("CogVideoXPipeline", {}, {"scaling_factor": 1.15258426}, SCHEDULER_2B),
    "cogvideox15": ("CogVideoXPipeline", TRANSFORMER_15, VAE_15, SCHEDULER_5B),
    "cogvideox_i2v": ("CogVideoXImageToVideoPipeline", {"in_channels": 32, "use_learned_positional_embeddings": True},
                      {"scaling_factor": 0.7}, SCHEDULER_5B),
    "cogvideox15_i2v": ("CogVideoXImageToVideoPipeline", {**TRANSFORMER_15, "in_channels": 32, "ofs_embed_dim": 16},
                        VAE_15, SCHEDULER_5B),
}


def save_tiny_cogvideox(root: str | Path, seed: int = 0, variant: str = "cogvideox", use_rotary: bool = True) -> Path:
    """Write the tiny `variant` (a key of `VARIANTS`) to `root` in its hub layout."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXTransformer3DModel,
    )

    pipeline_class, transformer_settings, vae_settings, scheduler = VARIANTS[variant]
    root = Path(root)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(**{
        "num_attention_heads": 2, "attention_head_dim": 16, "in_channels": 16, "out_channels": 16,
        "time_embed_dim": 16, "text_embed_dim": TINY_TEXT_DIM, "num_layers": 2, "sample_width": 4, "sample_height": 4,
        "sample_frames": 9, "patch_size": 2, "temporal_compression_ratio": 4, "max_text_seq_length": 16,
        "use_rotary_positional_embeddings": use_rotary, **transformer_settings})
    vae = AutoencoderKLCogVideoX(  # default sample size: tiles of 240x360 as the real VAE
        block_out_channels=(8, 8, 8, 16), latent_channels=16, layers_per_block=1, norm_num_groups=4,
        temporal_compression_ratio=4, **vae_settings)
    save_diffusers_layout(root, pipeline_class, {
        "transformer": transformer, "vae": vae, "scheduler": CogVideoXDDIMScheduler.from_config(scheduler),
        **tiny_t5(d_model=TINY_TEXT_DIM, seed=seed)})
    if transformer.config.in_channels == 32:  # image-to-video: the image preset=tiny validates with
        validation_image().save(root / VALIDATION_IMAGE)
    return root


def validation_image(size: int = 32):
    """A red circle on black at the right edge: the first frame of the demo clip "a red circle moves left"
    (`datamodules/demo_videos.py` draws the same shape)."""
    from PIL import Image

    radius, travel = size // 6, size - 2 * (size // 6) - 2
    yy, xx = np.mgrid[0:size, 0:size]
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[(xx - (size / 2 + 0.5 * travel)) ** 2 + (yy - size / 2) ** 2 <= radius**2] = (230, 40, 40)
    return Image.fromarray(pixels)
