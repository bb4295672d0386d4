"""A tiny random CogView3-Plus-3B, saved in the diffusers layout of THUDM/CogView3-Plus-3B.

Classes as in the hub checkpoint's `model_index.json`; scheduler and VAE settings as in diffusers'
`scripts/convert_cogview3_to_diffusers.py` (CogVideoXDDIMScheduler, v-prediction, zero terminal SNR,
`snr_shift_scale` 4.0; AutoencoderKL with 16 latent channels, `scaling_factor` 0.18215).
"""

from __future__ import annotations

from pathlib import Path

import torch

from recipes.cogview.cogview4_tiny import tiny_vae
from recipes.diffusion.tiny_layout import save_diffusers_layout
from recipes.diffusion.tiny_text import tiny_t5

TINY_TEXT_DIM = 32

SCHEDULER = {
    "_class_name": "CogVideoXDDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
    "snr_shift_scale": 4.0, "timestep_spacing": "trailing",
}


def save_tiny_cogview3plus(root: str | Path, seed: int = 0) -> Path:
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusTransformer2DModel

    root = Path(root)
    torch.manual_seed(seed)
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=16,
        text_embed_dim=TINY_TEXT_DIM, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8)
    return save_diffusers_layout(root, "CogView3PlusPipeline", {
        "transformer": transformer, "vae": tiny_vae(scaling_factor=0.18215, shift_factor=None),
        "scheduler": CogVideoXDDIMScheduler.from_config(SCHEDULER), **tiny_t5(d_model=TINY_TEXT_DIM, seed=seed)})
