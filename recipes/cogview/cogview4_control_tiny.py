"""A tiny random CogView4-6B-Control, saved in the diffusers layout of THUDM/CogView4-6B-Control.

The control checkpoint is CogView4-6B's layout with one change in the transformer: `in_channels=32` (16 latent
channels of the image being denoised, then 16 of the control image, concatenated on channels) and
`out_channels=16`; `CogView4ControlPipeline` reads `in_channels // 2` as the latent channel count
(diffusers 0.42.1 `pipeline_cogview4_control.py`; `scripts/convert_cogview4_to_diffusers_megatron.py --control`).
`model_index.json` names `CogView4ControlPipeline`. The VAE, GLM text encoder, tokenizer and scheduler are the
tiny CogView4's (recipes/cogview/cogview4_tiny.py), so the real `CogView4ControlPipeline.from_pretrained` loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from recipes.cogview.cogview4_tiny import SCHEDULER, TINY_TEXT_DIM, tiny_vae
from recipes.diffusion.tiny_layout import save_diffusers_layout
from recipes.diffusion.tiny_text import tiny_glm


def save_tiny_cogview4_control(root: str | Path, seed: int = 0) -> Path:
    from diffusers import CogView4Transformer2DModel, FlowMatchEulerDiscreteScheduler

    root = Path(root)
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2, in_channels=32, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        text_embed_dim=TINY_TEXT_DIM, time_embed_dim=16, condition_dim=8, pos_embed_max_size=16, sample_size=8,
        rope_axes_dim=(16, 16))
    return save_diffusers_layout(root, "CogView4ControlPipeline", {
        "transformer": transformer, "vae": tiny_vae(), "scheduler": FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER),
        **tiny_glm(hidden_size=TINY_TEXT_DIM, seed=seed)}, class_names={"tokenizer": "PreTrainedTokenizerFast"})
