"""A tiny random CogView3-Plus-3B, saved in the diffusers layout of THUDM/CogView3-Plus-3B.

Classes as in the hub checkpoint's `model_index.json`; scheduler and VAE settings as in diffusers'
`scripts/convert_cogview3_to_diffusers.py` (CogVideoXDDIMScheduler, v-prediction, zero terminal SNR,
`snr_shift_scale` 4.0; AutoencoderKL with 16 latent channels, `scaling_factor` 0.18215).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from recipes.cogview4_tiny import tiny_vae
from recipes.tiny_text import save_tiny_t5

TINY_TEXT_DIM = 32

SCHEDULER = {
    "_class_name": "CogVideoXDDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "set_alpha_to_one": True,
    "snr_shift_scale": 4.0, "timestep_spacing": "trailing",
}

MODEL_INDEX = {
    "_class_name": "CogView3PlusPipeline", "_diffusers_version": "0.42.1",
    "scheduler": ["diffusers", "CogVideoXDDIMScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
    "tokenizer": ["transformers", "T5Tokenizer"], "transformer": ["diffusers", "CogView3PlusTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}


def save_tiny_cogview3plus(root: str | Path, seed: int = 0) -> Path:
    from diffusers import CogVideoXDDIMScheduler, CogView3PlusTransformer2DModel

    root = Path(root)
    torch.manual_seed(seed)
    transformer = CogView3PlusTransformer2DModel(
        patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=2, out_channels=16,
        text_embed_dim=TINY_TEXT_DIM, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8)
    transformer.save_pretrained(root / "transformer")
    tiny_vae(scaling_factor=0.18215, shift_factor=None).save_pretrained(root / "vae")
    save_tiny_t5(root, d_model=TINY_TEXT_DIM, seed=seed)
    CogVideoXDDIMScheduler.from_config(SCHEDULER).save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
    return root
