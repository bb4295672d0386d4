"""CogVideoX text-to-video: loading, the official v-prediction objective, sampling and export.

Objective (THUDM/CogVideo `finetune/models/cogvideox_t2v/lora_trainer.py`, REFERENCE section 2):
`x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`, `t ~ U{0..T-1}`, the transformer predicts v, and the loss is
`mean((1 / (1 - abar)) * (x0_hat - x0)^2)` with `x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat`.
"""

from __future__ import annotations

import torch

from datamodules.video import check_video_size
from finetune.family import Sample, parse_dtype
from finetune.hub import resolve_pretrained
from recipes.diffusers_family import DiffusersFamily


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
    """

    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    frame_multiple = 8

    def __init__(self, path: str = "THUDM/CogVideoX-2b", dtype: str = "bf16", height: int = 480,
                 width: int = 720, num_frames: int = 49, max_sequence_length: int = 226,
                 enable_vae_tiling: bool = True):
        super().__init__()
        from diffusers import CogVideoXPipeline

        from recipes.cogvideox_tiny import save_tiny_cogvideox

        self.path = path
        local = resolve_pretrained(path, family="cogvideox", build_tiny=save_tiny_cogvideox)
        pipe = CogVideoXPipeline.from_pretrained(local, dtype=parse_dtype(dtype))
        self._attach(pipe, height, width, num_frames, max_sequence_length)
        if enable_vae_tiling:
            self.vae.enable_slicing()
            self.vae.enable_tiling()

    @classmethod
    def from_pipeline(cls, pipe, height: int, width: int, num_frames: int, max_sequence_length: int = 226,
                      path: str = "in-memory") -> "CogVideoX":
        """Wrap components built in memory (benchmarks with random real-size weights)."""
        self = cls.__new__(cls)
        DiffusersFamily.__init__(self)
        self.path = path
        self._attach(pipe, height, width, num_frames, max_sequence_length)
        return self

    def _attach(self, pipe, height: int, width: int, num_frames: int, max_sequence_length: int) -> None:
        from diffusers import CogVideoXDPMScheduler

        self.height, self.width, self.num_frames = height, width, num_frames
        self.max_sequence_length = max_sequence_length
        self.attach_pipeline(pipe)
        # The training scheduler of the official finetune; same alphas as the shipped DDIM config.
        self.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
        self._check_resolution()

    def _check_resolution(self) -> None:
        cfg = self.transformer.config
        check_video_size(self.height, self.width, self.num_frames, frame_multiple=8 * (cfg.patch_size_t or 1),
                         spatial_multiple=8 * cfg.patch_size, where="model")
        native = (cfg.sample_height * 8, cfg.sample_width * 8)
        if cfg.use_learned_positional_embeddings and (self.height, self.width) != native:
            raise ValueError(f"this checkpoint has learned positional embeddings for {native[0]}x{native[1]}; "
                             f"set model.height={native[0]} model.width={native[1]}.")

    def cache_namespace(self) -> str:
        return f"cogvideox|{self.path}|{self.height}x{self.width}x{self.num_frames}|{self.max_sequence_length}"

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
        mean, logvar = encoded["latent_mean"], encoded["latent_logvar"]
        std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        latents = (mean + std * torch.randn_like(mean)) * self.vae.config.scaling_factor
        latents = latents.permute(0, 2, 1, 3, 4)
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

    def training_loss(self, encoded: dict, noise: torch.Tensor | None = None,
                      timesteps: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.sample_latents(encoded)
        batch = x0.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (batch,), device=x0.device)
        if noise is None:
            noise = torch.randn_like(x0)
        x_t = self.scheduler.add_noise(x0, noise, timesteps)
        v_hat = self.transformer(
            hidden_states=x_t.to(self.transformer.dtype), encoder_hidden_states=encoded["prompt_embeds"].to(self.transformer.dtype),
            timestep=timesteps, image_rotary_emb=self.rotary_embeddings(x0), return_dict=False)[0]
        x0_hat = self.scheduler.get_velocity(v_hat.float(), x_t, timesteps)
        abar = self.scheduler.alphas_cumprod.to(x0.device)[timesteps].float()
        weights = (1.0 / (1.0 - abar)).view(batch, 1, 1, 1, 1)
        per_sample = (weights * (x0_hat - x0) ** 2).reshape(batch, -1).mean(dim=1)
        return per_sample.mean()

    # -- sampling and export --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[str], seed: int, num_inference_steps: int = 50,
                 guidance_scale: float = 6.0, fps: int = 8) -> list[Sample]:
        samples = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            frames = self.pipe(prompt, height=self.height, width=self.width, num_frames=self.num_frames,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               max_sequence_length=self.max_sequence_length, generator=generator,
                               output_type="np").frames[0]
            samples.append(Sample("video", (frames * 255).round().astype("uint8"), prompt, fps=fps))
        return samples
