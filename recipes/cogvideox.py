"""CogVideoX text-to-video: loading, the official v-prediction objective, sampling and export.

Objective (THUDM/CogVideo `finetune/models/cogvideox_t2v/lora_trainer.py`, REFERENCE section 2):
`x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`, `t ~ U{0..T-1}`, the transformer predicts v, and the loss is
`mean((1 / (1 - abar)) * (x0_hat - x0)^2)` with `x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.data import DataError, Processor, VideoSpec
from finetune.family import GenerationRequest, Sample, parse_dtype
from finetune.hub import resolve_pretrained
from recipes.diffusers_family import DiffusersFamily
from recipes.diffusion import sample_latents, v_prediction_loss


def check_video_settings(height: int, width: int, num_frames: int, transformer_config) -> None:
    """The checkpoint's rules: 8N+1 frames (the VAE compresses time 4x and keeps the first frame; 16N+1 for
    CogVideoX1.5, whose transformer patches latent frames in pairs), sides multiples of 8 x patch size, and the
    native size for checkpoints with learned positional embeddings (5B-I2V)."""
    cfg = transformer_config
    frame_multiple = 8 * (cfg.get("patch_size_t") or 1)
    if num_frames < 1 or (num_frames - 1) % frame_multiple:
        near = max(1, num_frames - (num_frames - 1) % frame_multiple)
        raise DataError(f"model.num_frames={num_frames} is not {frame_multiple}N+1 for this checkpoint. Use {near} or "
                        f"{near + frame_multiple}.")
    spatial_multiple = 8 * cfg.get("patch_size", 2)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % spatial_multiple:
            low = value - value % spatial_multiple
            raise DataError(f"model.{name}={value} is not a multiple of {spatial_multiple} (VAE 8x times the "
                            f"transformer's patches). Use {low or spatial_multiple} or {low + spatial_multiple}.")
    native = (cfg.get("sample_height", 60) * 8, cfg.get("sample_width", 90) * 8)
    if cfg.get("use_learned_positional_embeddings") and (height, width) != native:
        raise DataError(f"this checkpoint has learned positional embeddings for {native[0]}x{native[1]}; set "
                        f"model.height={native[0]} model.width={native[1]}.")


class CogVideoX(DiffusersFamily):
    """CogVideoX-2b / -5b (and 1.5) text-to-video.

    Args:
        path: hub id (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b), a local diffusers checkpoint, or `tiny`.
        dtype: weights of the frozen parts and the base transformer (bf16 for 5b, fp16 was used for 2b);
            trainable parameters are always kept in fp32.
        height, width, num_frames: training and validation resolution (8N+1 frames; 16N+1 for 1.5).
        max_sequence_length: T5 tokens (226 in the official recipe).
        enable_vae_tiling: encode/decode 49x480x720 videos in tiles and one sample at a time, as the
            official finetune does: far less memory, tiny seams. No effect below the tile size (240x360).
        pipeline: an already built `CogVideoXPipeline` to wrap instead of loading `path` (see `from_pipeline`).
    """

    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    pipeline_class = "CogVideoXPipeline"

    def __init__(self, path: str = "THUDM/CogVideoX-2b", dtype: str = "bf16", height: int = 480,
                 width: int = 720, num_frames: int = 49, max_sequence_length: int = 226,
                 enable_vae_tiling: bool = True, pipeline=None):
        super().__init__()
        import diffusers

        self.path, self.dtype_name = path, dtype
        self.height, self.width, self.num_frames = height, width, num_frames
        self.max_sequence_length = max_sequence_length
        if pipeline is None:
            self.data_processor(path=path, height=height, width=width, num_frames=num_frames)
            pipeline = getattr(diffusers, self.pipeline_class).from_pretrained(
                self.local_checkpoint(path), dtype=parse_dtype(dtype))
        else:
            check_video_settings(height, width, num_frames, pipeline.transformer.config)
        self.attach_pipeline(pipeline)
        # The training scheduler of the official finetune; same alphas as the shipped DDIM config.
        self.scheduler = diffusers.CogVideoXDPMScheduler.from_config(pipeline.scheduler.config)
        if enable_vae_tiling:
            self.vae.enable_slicing()
            self.vae.enable_tiling()

    @classmethod
    def from_pipeline(cls, pipe, height: int, width: int, num_frames: int, max_sequence_length: int = 226,
                      path: str = "in-memory") -> "CogVideoX":
        """Wrap components built in memory (benchmarks with random real-size weights)."""
        return cls(path=path, height=height, width=width, num_frames=num_frames,
                   max_sequence_length=max_sequence_length, enable_vae_tiling=False, pipeline=pipe)

    @classmethod
    def local_checkpoint(cls, path: str) -> str:
        from recipes.cogvideox_tiny import save_tiny_cogvideox

        return resolve_pretrained(path, family="cogvideox", build_tiny=save_tiny_cogvideox)

    @classmethod
    def data_processor(cls, path: str = "THUDM/CogVideoX-2b", height: int = 480, width: int = 720,
                       num_frames: int = 49, **_) -> Processor:
        """Clips of height x width x num_frames, checked against the checkpoint's transformer config."""
        config = json.loads((Path(cls.local_checkpoint(path)) / "transformer" / "config.json").read_text())
        check_video_settings(height, width, num_frames, config)
        return Processor(VideoSpec(height=height, width=width, num_frames=num_frames))

    def cache_namespace(self) -> str:
        return (f"cogvideox|{self.path}|{self.dtype_name}|{self.height}x{self.width}x{self.num_frames}"
                f"|{self.max_sequence_length}")

    # -- frozen encoders ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """`batch["video"]`: [B, F, C, H, W] in [-1, 1]; returns the VAE posterior's parameters
        (mean and logvar, so a cache still samples fresh latents each step) and T5 embeddings."""
        video = batch["video"].to(self.vae.device, self.vae.dtype).permute(0, 2, 1, 3, 4)  # [B, C, F, H, W]
        posterior = self.vae.encode(video).latent_dist
        prompt_embeds, _ = self.pipe.encode_prompt(
            list(batch["prompt"]), do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=self.text_encoder.device)
        return {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar, "prompt_embeds": prompt_embeds}

    # -- objective ------------------------------------------------------------------------------
    def sample_latents(self, encoded: dict) -> torch.Tensor:
        """`latent_dist.sample() * scaling_factor` laid out [B, F, C, H, W]."""
        latents = sample_latents(encoded, self.vae.config.scaling_factor).permute(0, 2, 1, 3, 4)
        p_t = self.transformer.config.patch_size_t
        if p_t is not None and latents.shape[1] % p_t:
            # CogVideoX1.5: prepend copies of the first latent frame to make the count divisible.
            pad = p_t - latents.shape[1] % p_t
            latents = torch.cat([latents[:, :1].repeat(1, pad, 1, 1, 1), latents], dim=1)
        return latents

    def rotary_embeddings(self, latents: torch.Tensor):
        if not self.transformer.config.use_rotary_positional_embeddings:
            return None
        # The inference pipeline's own function, so training sees the positions inference will use.
        _, frames, _, h, w = latents.shape
        scale = self.pipe.vae_scale_factor_spatial
        return self.pipe._prepare_rotary_positional_embeddings(h * scale, w * scale, frames, latents.device)

    def conditioning(self, x_t: torch.Tensor, encoded: dict) -> tuple[torch.Tensor, dict]:
        """The transformer's input for the noisy latents and any extra keyword arguments. Text-to-video: the
        latents as they are; an image-to-video subclass concatenates the image latents on channels here (and
        CogVideoX1.5-I2V passes `ofs`)."""
        return x_t, {}

    def training_loss(self, encoded: dict, noise: torch.Tensor | None = None,
                      timesteps: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.sample_latents(encoded)
        dtype = self.transformer.dtype
        prompt_embeds, rotary = encoded["prompt_embeds"].to(dtype), self.rotary_embeddings(x0)

        def predict(x_t, t):
            hidden_states, extra = self.conditioning(x_t, encoded)
            return self.transformer(hidden_states=hidden_states.to(dtype), encoder_hidden_states=prompt_embeds,
                                    timestep=t, image_rotary_emb=rotary, return_dict=False, **extra)[0]

        return v_prediction_loss(predict, self.scheduler, x0, noise=noise, timesteps=timesteps)

    # -- sampling -------------------------------------------------------------------------------
    def generate_one(self, request: GenerationRequest, generator: torch.Generator, num_inference_steps: int = 50,
                     guidance_scale: float = 6.0, fps: int = 8) -> Sample:
        frames = self.pipe(request.prompt, height=self.height, width=self.width, num_frames=self.num_frames,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           max_sequence_length=self.max_sequence_length, generator=generator,
                           output_type="np").frames[0]
        return Sample("video", (frames * 255).round().astype("uint8"), request.prompt, fps=fps)
