"""A tiny random CogView4-6B, saved in the diffusers layout of THUDM/CogView4-6B.

The real `CogView4Pipeline.from_pretrained` loads it, so tests and the demo exercise the same loading,
encoding, sampling and export code as the real model. Classes and scheduler config are those of the hub
checkpoint (`model_index.json`, `scheduler/scheduler_config.json` of THUDM/CogView4-6B); the VAE keeps the
real one's layout knobs (16 latent channels, 8x downsampling, no quant convs, `scaling_factor` 1.0,
shift 0, per diffusers' `scripts/convert_cogview4_to_diffusers_megatron.py`) at toy widths.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recipes.diffusion.tiny_layout import save_diffusers_layout
from recipes.diffusion.tiny_text import tiny_glm

TINY_TEXT_DIM = 32

# THUDM/CogView4-6B scheduler/scheduler_config.json.
SCHEDULER = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "base_image_seq_len": 256, "base_shift": 0.25,
    "invert_sigmas": False, "max_image_seq_len": 4096, "max_shift": 0.75, "num_train_timesteps": 1000,
    "shift": 1.0, "shift_terminal": None, "time_shift_type": "linear", "use_beta_sigmas": False,
    "use_dynamic_shifting": True, "use_exponential_sigmas": False, "use_karras_sigmas": False,
}


def tiny_vae(scaling_factor: float = 1.0, shift_factor: float | None = 0.0):
    """AutoencoderKL with CogView's layout (4 blocks = 8x, 16 latent channels, no quant convs, no mid
    attention) at toy widths."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(8, 8, 16, 16), layers_per_block=1,
        act_fn="silu", latent_channels=16, norm_num_groups=4, sample_size=64, scaling_factor=scaling_factor,
        shift_factor=shift_factor, force_upcast=True, use_quant_conv=False, use_post_quant_conv=False,
        mid_block_add_attention=False)


def save_tiny_cogview4(root: str | Path, seed: int = 0) -> Path:
    from diffusers import CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    root = Path(root)
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=TINY_TEXT_DIM, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(16, 16))
    return save_diffusers_layout(root, "CogView4Pipeline", {
        "transformer": transformer, "vae": tiny_vae(), "scheduler": FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER),
        **tiny_glm(hidden_size=TINY_TEXT_DIM, seed=seed)}, class_names={"tokenizer": "PreTrainedTokenizerFast"})
