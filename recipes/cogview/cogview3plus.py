"""CogView3-Plus text-to-image: loading, the v-prediction objective, sampling and a merged-LoRA export.

Objective (docs/objectives.md#cogview3-plus; the scheduler of THUDM/CogView3-Plus-3B, `CogVideoXDDIMScheduler` with
scaled-linear betas, `snr_shift_scale` 4.0 and zero terminal SNR): `t ~ U{0..999}`,
`x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`, the transformer predicts `v = sqrt(abar_t) eps -
sqrt(1 - abar_t) x0` and the loss is its MSE (the same as CogVideoX's x0-space loss weighted by
1 / (1 - abar)). Conditioning as `CogView3PlusPipeline`: T5 embeddings of prompts padded to
`max_sequence_length`, `original_size = target_size = (H, W)`, `crop_coords = (0, 0)`, integer timesteps.

diffusers has no LoRA loader for this model and its transformer is not a `PeftAdapterMixin`: the engine
injects LoRA with peft (`finetune.adapters.LoRA`), and the export writes the transformer with the LoRA merged
in (`W + (alpha / r) B A`), in the diffusers layout, which the pipeline loads as a component, next to the LoRA
itself (`transformer_lora.safetensors`, to start another run from or evaluate with `adapter_path`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from finetune.adapters import LoRA, merged_state_dict
from finetune.family import GenerationRequest, Sample, parse_dtype
from finetune.hub import resolve_pretrained
from finetune.lora_formats.files import MODEL_KEY
from recipes.cogview.cogview4 import BucketedImageFamily
from recipes.diffusion.pipeline import load_pipeline
from recipes.diffusion.objectives import sample_latents, v_prediction_loss

LORA_FILE = "transformer_lora.safetensors"


class CogView3Plus(BucketedImageFamily):
    """CogView3-Plus-3B text-to-image.

    Args:
        path: hub id (THUDM/CogView3-Plus-3B), a local diffusers checkpoint, or `tiny`.
        dtype: weights of the frozen parts and the base transformer; trainable parameters stay fp32.
        height, width: size of the validation samples (training sizes come from the data's buckets).
        max_sequence_length: T5 tokens; prompts are padded to it (224, as the pipeline).
        bucket_pixels, min_side, max_side, bucket_multiple, max_pixels: the training buckets' area and the sizes
            the model generates (as CogView4: 512..2048, multiples of 32, at most 2^21 pixels).
        checkpoint: the local folder of `path` when the caller resolved it already (`finetune.run.build` does, once);
            None: resolved here (`local_checkpoint`).
    """

    text_encoder_name = "T5"  # the data report's long-caption count
    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    block_class_names = ("CogView3PlusTransformerBlock",)  # what fsdp2 shards and block swap streams
    display_name = "CogView3-Plus"
    transformer_class = "CogView3PlusTransformer2DModel"
    base_family = "CogView3-Plus"
    setting_ranges = {"height": ">0", "width": ">0", "max_sequence_length": ">=1", "bucket_pixels": ">0",
                      "min_side": ">0", "max_side": ">0", "bucket_multiple": ">=1",
                      "max_pixels": ">0"}  # checked by finetune.settings.check before anything is built

    def __init__(self, path: str = "THUDM/CogView3-Plus-3B", dtype: str = "bf16", height: int = 1024,
                 width: int = 1024, max_sequence_length: int = 224, bucket_pixels: int = 1024 * 1024,
                 min_side: int = 512, max_side: int = 2048, bucket_multiple: int = 32, max_pixels: int = 2**21,
                 checkpoint: str | None = None):
        super().__init__()
        from diffusers import CogVideoXDDIMScheduler

        self.data_processor(height=height, width=width, bucket_pixels=bucket_pixels, min_side=min_side,
                            max_side=max_side, bucket_multiple=bucket_multiple, max_pixels=max_pixels)
        self.path, self.dtype_name = path, dtype
        self.height, self.width, self.max_sequence_length = height, width, max_sequence_length
        local = self.checkpoint_dir = checkpoint or self.local_checkpoint(path)
        self.attach_pipeline(load_pipeline("CogView3PlusPipeline", local, parse_dtype(dtype)))
        self.scheduler = CogVideoXDDIMScheduler.from_config(self.pipeline.scheduler.config)
        if self.scheduler.config.prediction_type != "v_prediction":
            raise ValueError(f"{local}: scheduler prediction_type={self.scheduler.config.prediction_type!r}; "
                             f"this recipe trains v-prediction as CogView3-Plus does.")

    @classmethod
    def local_checkpoint(cls, path: str, weights: bool = True) -> str:
        """The local folder of `path` (hub id, folder, or `tiny`: built once into the kit cache); `weights=False`:
        a hub id's configs and tokenizers only (`finetune.hub.resolve_pretrained`)."""
        from recipes.cogview.cogview3plus_tiny import save_tiny_cogview3plus

        return resolve_pretrained(path, family="cogview3plus", build_tiny=save_tiny_cogview3plus, weights=weights)

    def cache_namespace(self) -> str:
        return f"cogview3plus|{self.path}|encoders={self.encoder_files()}|{self.dtype_name}|{self.max_sequence_length}"

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """`batch["image"]`: [B, 3, H, W] in [-1, 1]; the VAE posterior and T5 embeddings (all prompts
        padded to `max_sequence_length`, as the pipeline, so no mask is needed)."""
        image = batch["image"].to(self.vae.device, self.vae.dtype)
        posterior = self.vae.encode(image).latent_dist
        prompt_embeds, _ = self.pipeline.encode_prompt(list(batch["prompt"]), do_classifier_free_guidance=False,
                                                   max_sequence_length=self.max_sequence_length,
                                                   device=self.text_encoder.device)
        return {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar, "prompt_embeds": prompt_embeds}

    def sample_latents(self, encoded: dict) -> torch.Tensor:
        """`latent_dist.sample() * scaling_factor` (the pipeline decodes `latents / scaling_factor`)."""
        return sample_latents(encoded, self.component_config("vae").scaling_factor)

    def training_loss(self, encoded: dict, noise: torch.Tensor | None = None,
                      timesteps: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.sample_latents(encoded)
        batch, _, h, w = x0.shape
        scale, dtype = self.pipeline.vae_scale_factor, self.transformer_dtype
        sizes = torch.tensor([[h * scale, w * scale]] * batch, dtype=dtype, device=x0.device)
        prompt_embeds = encoded["prompt_embeds"].to(dtype)

        def predict(x_t, t):
            return self.transformer(
                hidden_states=x_t.to(dtype), encoder_hidden_states=prompt_embeds, timestep=t, original_size=sizes,
                target_size=sizes, crop_coords=torch.zeros_like(sizes), return_dict=False)[0]

        return v_prediction_loss(predict, self.scheduler, x0, noise=noise, timesteps=timesteps)

    def generate_one(self, request: GenerationRequest, generator: torch.Generator, num_inference_steps: int = 50,
                     guidance_scale: float = 7.0) -> Sample:
        return self.generate_image(request, generator, num_inference_steps, guidance_scale)

    # -- export ---------------------------------------------------------------------------------
    def export(self, directory: str | os.PathLike, adapter, record: dict | None = None) -> Path:
        """LoRA: the merged transformer (`write_merged_transformer`) and the LoRA itself; full: `transformer/`."""
        if isinstance(adapter, LoRA):
            return self.write_merged_transformer(directory, adapter.adapter_name, self.model_record(record))
        return self.write_transformer(directory)

    def write_merged_transformer(self, directory: str | os.PathLike, adapter_name: str = "default",
                                 model: dict | None = None) -> Path:
        """`directory/transformer/` with the LoRA folded into the weights, in diffusers layout, and
        `directory/transformer_lora.safetensors` (the LoRA, its settings in the header). The training model is
        untouched."""
        from safetensors.torch import save_file

        path = Path(directory) / "transformer"
        path.mkdir(parents=True, exist_ok=True)
        self.transformer.save_config(path)
        save_file(merged_state_dict(self.transformer, adapter_name), str(path / "diffusion_pytorch_model.safetensors"),
                  metadata={"format": "pt"})
        state, config = self.lora_state(adapter_name)
        config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
        save_file({f"transformer.{k}": v for k, v in state.items()}, str(Path(directory) / LORA_FILE),
                  metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config, default=str),
                            **({MODEL_KEY: json.dumps(model, sort_keys=True)} if model else {})})
        return path

    def lora_file_name(self) -> str:
        return LORA_FILE
