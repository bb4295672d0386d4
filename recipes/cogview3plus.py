"""CogView3-Plus text-to-image: loading, the v-prediction objective, sampling and a merged-LoRA export.

Objective (REFERENCE section 2; the scheduler of THUDM/CogView3-Plus-3B, `CogVideoXDDIMScheduler` with
scaled-linear betas, `snr_shift_scale` 4.0 and zero terminal SNR): `t ~ U{0..999}`,
`x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, the transformer predicts `v = sqrt(abar_t) eps -
sqrt(1 - abar_t) x0` and the loss is its MSE (the same as CogVideoX's x0-space loss weighted by
1 / (1 - abar)). Conditioning as `CogView3PlusPipeline`: T5 embeddings of prompts padded to
`max_sequence_length`, `original_size = target_size = (H, W)`, `crop_coords = (0, 0)`, integer timesteps.

diffusers has no LoRA loader for this model and its transformer is not a `PeftAdapterMixin`: the engine
injects LoRA with peft (`finetune.adapters.LoRA`), and `save_lora` writes the transformer with the LoRA
merged in (`W + (alpha / r) B A`), in the diffusers layout, which the pipeline loads as a component.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from finetune.adapters import merged_state_dict
from finetune.family import parse_dtype
from finetune.hub import resolve_pretrained
from recipes.diffusers_family import DiffusersFamily


class CogView3Plus(DiffusersFamily):
    """CogView3-Plus-3B text-to-image.

    Args:
        path: hub id (THUDM/CogView3-Plus-3B), a local diffusers checkpoint, or `tiny`.
        dtype: weights of the frozen parts and the base transformer; trainable parameters stay fp32.
        height, width: size of the validation samples (training sizes come from the data's buckets).
        max_sequence_length: T5 tokens; prompts are padded to it (224, as the pipeline).
    """

    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")

    def __init__(self, path: str = "THUDM/CogView3-Plus-3B", dtype: str = "bf16", height: int = 1024,
                 width: int = 1024, max_sequence_length: int = 224):
        super().__init__()
        from diffusers import CogVideoXDDIMScheduler, CogView3PlusPipeline

        from recipes.cogview3plus_tiny import save_tiny_cogview3plus

        for name, value in (("height", height), ("width", width)):
            if value % 32:
                raise ValueError(f"model.{name}={value}: CogView3-Plus needs multiples of 32; use "
                                 f"{value - value % 32 or 32}.")
        self.path, self.dtype_name = path, dtype
        self.height, self.width, self.max_sequence_length = height, width, max_sequence_length
        local = resolve_pretrained(path, family="cogview3plus", build_tiny=save_tiny_cogview3plus)
        self.attach_pipeline(CogView3PlusPipeline.from_pretrained(local, dtype=parse_dtype(dtype)))
        self.scheduler = CogVideoXDDIMScheduler.from_config(self.pipe.scheduler.config)
        if self.scheduler.config.prediction_type != "v_prediction":
            raise ValueError(f"{local}: scheduler prediction_type={self.scheduler.config.prediction_type!r}; "
                             f"this recipe trains v-prediction as CogView3-Plus does.")

    def cache_namespace(self) -> str:
        return f"cogview3plus|{self.path}|{self.dtype_name}|{self.max_sequence_length}"

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """`batch["image"]`: [B, 3, H, W] in [-1, 1]; the VAE posterior and T5 embeddings (all prompts
        padded to `max_sequence_length`, as the pipeline, so no mask is needed)."""
        image = batch["image"].to(self.vae.device, self.vae.dtype)
        posterior = self.vae.encode(image).latent_dist
        prompt_embeds, _ = self.pipe.encode_prompt(list(batch["prompt"]), do_classifier_free_guidance=False,
                                                   max_sequence_length=self.max_sequence_length,
                                                   device=self.text_encoder.device)
        return {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar, "prompt_embeds": prompt_embeds}

    def sample_latents(self, encoded: dict) -> torch.Tensor:
        """`latent_dist.sample() * scaling_factor` (the pipeline decodes `latents / scaling_factor`)."""
        mean, logvar = encoded["latent_mean"].float(), encoded["latent_logvar"].float()
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        return (mean + std * torch.randn_like(mean)) * self.vae.config.scaling_factor

    def training_loss(self, encoded: dict, noise: torch.Tensor | None = None,
                      timesteps: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.sample_latents(encoded)
        batch, _, h, w = x0.shape
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        target = self.scheduler.get_velocity(x0, noise, timesteps)
        scale = self.pipe.vae_scale_factor
        dtype = self.transformer.dtype
        sizes = torch.tensor([[h * scale, w * scale]] * batch, dtype=dtype, device=x0.device)
        v_hat = self.transformer(
            hidden_states=x_t.to(dtype), encoder_hidden_states=encoded["prompt_embeds"].to(dtype), timestep=timesteps,
            original_size=sizes, target_size=sizes, crop_coords=torch.zeros_like(sizes), return_dict=False)[0]
        return ((v_hat.float() - target) ** 2).reshape(batch, -1).mean(dim=1).mean()

    def generate(self, prompts: list[str], seed: int, num_inference_steps: int = 50,
                 guidance_scale: float = 7.0) -> list:
        return self.generate_images(prompts, seed, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale)

    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
        """The transformer with the LoRA merged in, in diffusers layout (`directory/transformer/`), plus the
        LoRA's settings in `directory/lora_config.json` for the record. The training model is untouched."""
        from safetensors.torch import save_file

        path = Path(directory) / "transformer"
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_config(path)
        save_file(merged_state_dict(self.transformer, adapter_name), str(path / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
        config = self.transformer.peft_config[adapter_name].to_dict()
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        (Path(directory) / "lora_config.json").write_text(json.dumps(config, indent=2, default=str))
        return path
