"""A tiny random CogVideoX-2b, saved in the diffusers layout of THUDM/CogVideoX-2b.

The real `CogVideoXPipeline.from_pretrained` loads it, so tests and the demo exercise the same loading,
encoding and export code as the real model. Sizes: 32x32 pixels, 9 frames -> 4x4x3 latents.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recipes.tiny_layout import save_diffusers_layout
from recipes.tiny_text import tiny_t5

TINY_TEXT_DIM = 32

# The scheduler config shipped with THUDM/CogVideoX-2b (5b: snr_shift_scale 1.0).
SCHEDULER_2B = {
    "_class_name": "CogVideoXDDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "clip_sample_range": 1.0,
    "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "snr_shift_scale": 3.0, "steps_offset": 0,
    "timestep_spacing": "trailing",
}


def save_tiny_cogvideox(root: str | Path, seed: int = 0, use_rotary: bool = True, patch_size_t: int | None = None) -> Path:
    """`patch_size_t=2` gives a tiny CogVideoX1.5 (frames 16N+1, latent frames patched in pairs)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXTransformer3DModel,
    )

    root = Path(root)
    torch.manual_seed(seed)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16, time_embed_dim=16,
        text_embed_dim=TINY_TEXT_DIM, num_layers=2, sample_width=4, sample_height=4, sample_frames=9,
        patch_size=2, patch_size_t=patch_size_t, temporal_compression_ratio=4, max_text_seq_length=16,
        use_rotary_positional_embeddings=use_rotary)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 16), latent_channels=16, layers_per_block=1, norm_num_groups=4,
        temporal_compression_ratio=4, scaling_factor=1.15258426)  # default sample size: tiles of 240x360 as the real VAE
    return save_diffusers_layout(root, "CogVideoXPipeline", {
        "transformer": transformer, "vae": vae, "scheduler": CogVideoXDDIMScheduler.from_config(SCHEDULER_2B),
        **tiny_t5(d_model=TINY_TEXT_DIM, seed=seed)})
