"""CogVideoX image-to-video (THUDM/CogVideoX-5b-I2V, THUDM/CogVideoX1.5-5B-I2V): the text-to-video family plus
the image the video starts from.

Objective (THUDM/CogVideo `finetune/models/cogvideox_i2v/lora_trainer.py`, diffusers
`examples/cogvideo/train_cogvideox_image_to_video_lora.py`; docs/objectives.md#cogvideox-image-to-video): as text-to-video, with the
transformer reading `[x_t, image latents]` on channels (in_channels 32). The image latents, built each step:
- noise augmentation in pixel space: `img' = img + sigma * eps`, `sigma = exp(N(-3, 0.5))` (one draw per sample;
  the official trainers draw one per batch, the same at their batch size 1);
- a draw from the VAE posterior of `img'` (as the pipeline's `retrieve_latents`), times `scaling_factor`, or
  `1 / scaling_factor` when the VAE config has `invert_scale_latents` (CogVideoX1.5): what the installed
  `CogVideoXImageToVideoPipeline.prepare_latents` does, which is what loads the LoRA. The official 1.5 trainers
  multiply instead (finetrainers #110, #155, #160: washed-out or static videos); a test pins the pipeline's way;
- zeros for the other latent frames (1.5: the frame count after the first latent frame is repeated to make it
  even, so the image latent sits beside that repeated frame, as at inference where the pipeline drops it);
- dropped (all zeros) with probability `image_dropout` per sample, as the diffusers example.
1.5-I2V also gets `ofs=2.0` (a [1] tensor in the transformer's dtype), as the pipeline passes it.

Rotary positions are the pipeline's, as in text-to-video (`recipes/cogvideox/family.py`). The 5B-I2V checkpoint also adds
a learned positional embedding fixed to 49 x 480 x 720, so it trains at that size only (checked before it loads).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from finetune.data import DataError
from finetune.family import GenerationRequest, Sample
from recipes.cogvideox.family import CogVideoX
from recipes.diffusion.objectives import sample_latents

IMAGE_NOISE_LOG_MEAN, IMAGE_NOISE_LOG_STD = -3.0, 0.5  # sigma = exp(N(-3, 0.5)): about 0.05, in [-1, 1] pixels
OFS = 2.0  # the pipeline's (and the official trainer's) `ofs` for CogVideoX1.5-I2V


class CogVideoXImageToVideo(CogVideoX):
    """CogVideoX-5b-I2V (and, read from its configs, 1.5-I2V). Arguments as `CogVideoX`, plus:

    Args:
        image_dropout: probability that a sample trains without its image (zeros), as the diffusers example (0.05);
            keeps the model usable with a weak or no image; 0 turns it off.
        cache_image_latents: encode the clean image once in `encode` (cached with the other encodings) instead of
            the noise-augmented image every step. Deviates from the official objective (no noise augmentation):
            saves one VAE image encode per step.
    """

    pipeline_class = "CogVideoXImageToVideoPipeline"
    family_name = "cogvideox_i2v"
    base_variant = "I2V 1.0"
    conditioning_image = True  # each clip with its first frame (`image`, [3, H, W] in [-1, 1])
    # An image-to-video sample is the motion that follows its first frame; a one-frame sample has none to learn, and
    # the official I2V finetune trains clips only. The data module refuses images before the model loads.
    one_frame_samples = False
    setting_ranges = {**CogVideoX.setting_ranges, "image_dropout": "[0, 1]"}

    # The settings are the schema (finetune/settings/check.py): CogVideoX's, named again, and the two of
    # image-to-video; their defaults are conf/model/cogvideox_i2v.yaml's.
    def __init__(self, path: str, dtype: str, height: int, width: int, num_frames: int, buckets: list | None,
                 max_sequence_length: int, enable_vae_tiling: bool, image_dropout: float, cache_image_latents: bool,
                 quantize_base: str | None = None, pipeline=None, checkpoint: str | None = None):
        super().__init__(path=path, dtype=dtype, height=height, width=width, num_frames=num_frames, buckets=buckets,
                         max_sequence_length=max_sequence_length, enable_vae_tiling=enable_vae_tiling,
                         quantize_base=quantize_base, pipeline=pipeline, checkpoint=checkpoint)
        self.image_dropout, self.cache_image_latents = image_dropout, cache_image_latents

    def cache_namespace(self) -> str:
        return f"{super().cache_namespace()}|image_latents={self.cache_image_latents}"

    def encoder_names(self) -> tuple[str, ...]:
        """The text encoder; the VAE too with `cache_image_latents` (else it encodes the noisy image every step)."""
        return ("vae", "text_encoder") if self.cache_image_latents else ("text_encoder",)

    def training_components(self) -> dict[str, str]:
        if self.cache_image_latents:
            return {}
        return {"vae": "image-to-video encodes the noisy conditioning image with the VAE every step; "
                       "model.cache_image_latents=true caches the image latents and frees it"}

    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """Text-to-video's encodings plus the pixel image (noise-augmented and encoded each step in
        `image_latents`), or with `cache_image_latents` the clean image's VAE posterior."""
        if "image" not in batch:
            raise KeyError("an image-to-video batch needs `image` [B, 3, H, W] in [-1, 1]: use a data module that "
                           "honours VideoSpec(conditioning_image=True), e.g. datamodules.video.VideoDataModule.")
        if batch["video"].shape[1] == 1:  # the data module refuses them first (VideoSpec.one_frame=False)
            raise DataError(f"{self.family_name}: a one-frame sample (an image) cannot train image-to-video: it has no "
                            f"frames after the one it starts from. Train images with the text-to-video recipe "
                            f"(cogvideox_lora / cogvideox15_lora), or remove them from the data.")
        encoded = super().encode(batch)
        image = batch["image"].to(self.vae.device, self.vae.dtype)
        if not self.cache_image_latents:
            return {**encoded, "image": image}
        posterior = self.vae.encode(image.unsqueeze(2)).latent_dist  # [B, C, 1, h, w]
        return {**encoded, "image_latent_mean": posterior.mean, "image_latent_logvar": posterior.logvar}

    @torch.no_grad()
    def image_latents(self, encoded: dict, frames: int, sigma: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, frames, C, h, w]: the (noise-augmented) image's latents in frame 0, zeros after. `sigma` (per
        sample) and `generator` (the posterior draw) fix what is otherwise drawn."""
        if self.cache_image_latents:
            latents = sample_latents({"latent_mean": encoded["image_latent_mean"],
                                      "latent_logvar": encoded["image_latent_logvar"]}, 1.0)
        else:
            image = encoded["image"].float()
            if sigma is None:
                sigma = torch.exp(torch.normal(IMAGE_NOISE_LOG_MEAN, IMAGE_NOISE_LOG_STD, size=(len(image),),
                                               device=image.device))
            noisy = image + sigma.to(image).view(-1, 1, 1, 1) * torch.randn_like(image)
            posterior = self.vae.encode(noisy.unsqueeze(2).to(self.vae.dtype)).latent_dist
            latents = posterior.sample(generator)
        latents = latents.permute(0, 2, 1, 3, 4).float()  # [B, 1, C, h, w]
        config = self.component_config("vae")
        scaling = config.scaling_factor
        latents = (1 / scaling) * latents if config.invert_scale_latents else scaling * latents
        padding = latents.new_zeros(latents.shape[0], frames - 1, *latents.shape[2:])
        return torch.cat([latents, padding], dim=1)

    def conditioning(self, x_t: torch.Tensor, encoded: dict) -> tuple[torch.Tensor, dict]:
        """`[x_t, image latents]` on channels; `ofs` for checkpoints with an ofs embedding (1.5-I2V)."""
        image_latents = self.image_latents(encoded, frames=x_t.shape[1]).to(x_t)
        if self.image_dropout > 0:
            keep = torch.rand(len(x_t), device=x_t.device) >= self.image_dropout
            image_latents = image_latents * keep.to(x_t).view(-1, 1, 1, 1, 1)
        extra = {}
        if self.transformer.config.ofs_embed_dim is not None:
            extra["ofs"] = torch.full((1,), OFS, dtype=self.transformer_dtype, device=x_t.device)
        return torch.cat([x_t, image_latents], dim=2), extra

    # -- sampling -------------------------------------------------------------------------------
    def generate_one(self, request: GenerationRequest, generator: torch.Generator, num_inference_steps: int = 50,
                     guidance_scale: float = 6.0, fps: int = 8) -> Sample:
        image = self.load_image(request.image)
        frames = self.pipeline(image=image, **self.prompt_arguments(request), height=self.height, width=self.width,
                           num_frames=self.num_frames, num_inference_steps=num_inference_steps,
                           guidance_scale=guidance_scale, max_sequence_length=self.max_sequence_length,
                           generator=generator, output_type="np").frames[0]
        return Sample("video", (frames * 255).round().astype("uint8"), request.prompt, fps=fps, condition=image)

    def load_image(self, image):
        """A validation request's image: a PIL image, or a path (absolute, relative to the working directory, or
        to the checkpoint folder: the tiny checkpoints hold `validation_image.png`)."""
        from PIL import Image

        if image is None:
            raise ValueError("image-to-video validation needs an image per prompt: write callbacks.samples.prompts "
                             "entries as {prompt: ..., image: PATH}.")
        if not isinstance(image, (str, os.PathLike)):
            return image
        path = Path(image).expanduser()
        candidates = [path] + ([Path(self.checkpoint_dir) / path] if self.checkpoint_dir and not path.is_absolute()
                               else [])
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"callbacks.samples.prompts: image {str(image)!r} does not exist (looked for "
                                    f"{', '.join(str(c) for c in candidates)}); give the path of an image file.")
        return Image.open(found).convert("RGB")


class CogVideoX15ImageToVideo(CogVideoXImageToVideo):
    """CogVideoX1.5-5B-I2V: `CogVideoXImageToVideo` with 1.5's tiny model (its checkpoint and size, 81 x 768 x 1360;
    the model card: sides 768..1360, multiples of 16, are settings: conf/model/cogvideox15_i2v.yaml)."""

    family_name = "cogvideox15_i2v"
    base_variant = "I2V 1.5"
