"""CogVideoX text-to-video (2b, 5b, 1.5-5B): loading, the official v-prediction objective, sampling and export.

Objective (THUDM/CogVideo `finetune/models/cogvideox_t2v/lora_trainer.py`; docs/objectives.md#cogvideox-text-to-video):
`x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`, `t ~ U{0..T-1}`, the transformer predicts v, and the loss is
`mean((1 / (1 - abar)) * (x0_hat - x0)^2)` with `x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat`.

Rotary positions come from the installed pipeline's own `_prepare_rotary_positional_embeddings`, so a LoRA trains
on the positions inference gives it. For 1.0 checkpoints at a size other than the native 480x720 the pipeline
squeezes the grid into the native one (fractional `linspace` positions), while the official finetune uses integer
positions (`grid_type="slice"`): the two agree at the native size only, and the kit follows the pipeline
(`tests/recipes/cogvideox/test_cogvideox_i2v.py` pins it). For 1.5 both use the slice grid at every size.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

from finetune.data import DataError, Processor, TextLimit, VideoSpec
from finetune.family import GenerationRequest, Sample, parse_dtype
from finetune.hub import resolve_pretrained
from recipes.cogvideox.keys import COGVIDEOX_LORA_NAMES, recognize_cogvideox_lora
from recipes.diffusion.pipeline import DiffusersFamily, base_quantization, load_pipeline
from recipes.diffusion.objectives import sample_latents, v_prediction_loss


def check_video_settings(height: int, width: int, num_frames: int, transformer_config,
                         bucket: int | None = None) -> None:
    """The checkpoint's rules: 8N+1 frames (the VAE compresses time 4x and keeps the first frame; 16N+1 for
    CogVideoX1.5, whose transformer patches latent frames in pairs), sides multiples of 8 x patch size, the native
    size for checkpoints with learned positional embeddings (5B-I2V), and for 1.5 at most the size its rotary grid
    covers. `bucket`: the index in `model.buckets` the size comes from (None: model.num_frames/height/width)."""
    cfg = transformer_config
    where = "" if bucket is None else f"model.buckets[{bucket}]=[{num_frames}, {height}, {width}]: "
    names = ({"frames": "model.num_frames", "height": "model.height", "width": "model.width"} if bucket is None
             else {"frames": "frames", "height": "height", "width": "width"})
    frame_multiple = 8 * (cfg.get("patch_size_t") or 1)
    if num_frames < 1 or (num_frames - 1) % frame_multiple:
        near = max(1, num_frames - (num_frames - 1) % frame_multiple)
        raise DataError(f"{where}{names['frames']}={num_frames} is not {frame_multiple}N+1 for this checkpoint. Use "
                        f"{near} or {near + frame_multiple}.")
    spatial_multiple = 8 * cfg.get("patch_size", 2)
    for name, value in (("height", height), ("width", width)):
        if value <= 0 or value % spatial_multiple:
            low = value - value % spatial_multiple
            raise DataError(f"{where}{names[name]}={value} is not a multiple of {spatial_multiple} (VAE 8x times the "
                            f"transformer's patches). Use {low or spatial_multiple} or {low + spatial_multiple}.")
    native = (cfg.get("sample_frames", 49), cfg.get("sample_height", 60) * 8, cfg.get("sample_width", 90) * 8)
    if cfg.get("use_learned_positional_embeddings") and (num_frames, height, width) != native:
        # diffusers refuses another height/width, and at another frame count silently swaps the learned embedding
        # for a sin-cos one the checkpoint never saw.
        fix = (f"model.num_frames={native[0]} model.height={native[1]} model.width={native[2]}" if bucket is None
               else f"model.buckets[{bucket}]=[{native[0]}, {native[1]}, {native[2]}]")
        raise DataError(f"{where}{num_frames} frames of {height}x{width}: this checkpoint (CogVideoX-5B-I2V) has a "
                        f"learned positional embedding for {native[0]} frames of {native[1]}x{native[2]} only. Set "
                        f"{fix}, or train CogVideoX1.5-5B-I2V (recipe=cogvideox15_i2v_lora), which takes other sizes.")
    largest = (cfg.get("sample_height", 60) * 8, cfg.get("sample_width", 90) * 8)
    if cfg.get("patch_size_t") and (height > largest[0] or width > largest[1]):
        raise DataError(f"{where}{height}x{width}: this checkpoint's rotary positions cover at most "
                        f"{largest[0]}x{largest[1]}. Use a smaller {names['height']}/{names['width']}.")


def video_buckets(num_frames: int, height: int, width: int, buckets, transformer_config) -> tuple:
    """`model.buckets` ([[frames, height, width], ...]; None: the one size num_frames x height x width), each
    checked against the checkpoint's rules."""
    if not buckets:
        return ((num_frames, height, width),)
    sizes = tuple(tuple(int(v) for v in bucket) for bucket in buckets)
    for i, size in enumerate(sizes):
        if len(size) != 3:
            raise DataError(f"model.buckets[{i}]={list(size)}: give each bucket as [frames, height, width].")
        check_video_settings(size[1], size[2], size[0], transformer_config, bucket=i)
    return sizes


class CogVideoX(DiffusersFamily):
    """CogVideoX-2b / -5b text-to-video (any CogVideoX checkpoint loaded by `CogVideoXPipeline`; 1.5's differences
    are read from its configs, `CogVideoX15` only changes the tiny model).

    Args:
        path: hub id (THUDM/CogVideoX-2b, THUDM/CogVideoX-5b), a local diffusers checkpoint, or `tiny`.
        dtype: weights of the frozen parts and the base transformer (bf16 for 5b, fp16 was used for 2b);
            trainable parameters are always kept in fp32.
        height, width, num_frames: the validation samples' size, and the training size unless `buckets` is set
            (8N+1 frames; 16N+1 for 1.5).
        buckets: training sizes `[[frames, height, width], ...]`, each checked against the checkpoint's rules;
            None: the one size num_frames x height x width.
        max_sequence_length: T5 tokens (226 in the official recipe).
        enable_vae_tiling: encode/decode 49x480x720 videos in tiles and one sample at a time, as the
            official finetune does: far less memory, tiny seams. No effect below the tile size (240x360).
        quantize_base: null, or nf4 for QLoRA: the transformer's linear layers stored in 4 bits (bitsandbytes; CUDA,
            LoRA only, `base_quantization` in recipes/diffusion/pipeline.py).
        pipeline: an already built `CogVideoXPipeline` to wrap instead of loading `path` (see `from_pipeline`).
        checkpoint: the local folder of `path` when the caller resolved it already (`finetune.run.build` does, once);
            None: resolved here (`local_checkpoint`).
    """

    lora_target_modules = ("to_q", "to_k", "to_v", "to_out.0")
    block_class_names = ("CogVideoXBlock",)  # what fsdp2 shards and block swap streams
    lora_names = COGVIDEOX_LORA_NAMES  # native ComfyUI and SAT spellings (recipes/cogvideox/keys.py)

    @classmethod
    def recognize_lora(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        return recognize_cogvideox_lora(shapes)
    export_formats = ("diffusers", "comfy", "kohya")  # callbacks.export.formats=[diffusers,comfy]
    pipeline_class = "CogVideoXPipeline"
    setting_ranges = {"height": ">0", "width": ">0", "num_frames": ">=1",
                      "max_sequence_length": ">=1"}  # checked by finetune.settings.check before anything is built
    #: the tiny model `path=tiny` builds (a variant of `recipes.cogvideox.tiny`); also names the encoder cache
    family_name = "cogvideox"
    base_family, base_variant = "CogVideoX", "T2V 1.0"
    #: whether each clip comes with the image it starts from (image-to-video)
    conditioning_image = False
    #: images train as one-frame videos in (1, H, W) buckets (docs/cogvideox.md#images-in-video-training): the VAE
    #: keeps a lone frame as one latent frame, as the pipeline's `num_frames=1` does ((1 - 1) // 4 + 1 = 1)
    one_frame_samples = True

    def __init__(self, path: str = "THUDM/CogVideoX-2b", dtype: str = "bf16", height: int = 480,
                 width: int = 720, num_frames: int = 49, buckets: list | None = None, max_sequence_length: int = 226,
                 enable_vae_tiling: bool = True, quantize_base: str | None = None, pipeline=None,
                 checkpoint: str | None = None):
        super().__init__()
        import diffusers

        quantization = base_quantization(quantize_base, parse_dtype(dtype))  # before anything loads
        self.path, self.dtype_name = path, dtype
        self.height, self.width, self.num_frames = height, width, num_frames
        self.max_sequence_length = max_sequence_length
        self.checkpoint_dir = None if pipeline is not None else checkpoint or self.local_checkpoint(path)
        if pipeline is None:
            self.buckets = self.data_processor(self.checkpoint_dir, height=height, width=width, num_frames=num_frames,
                                               buckets=buckets).spec.buckets
            pipeline = load_pipeline(self.pipeline_class, self.checkpoint_dir, parse_dtype(dtype), quantization)
        else:
            check_video_settings(height, width, num_frames, pipeline.transformer.config)
            self.buckets = video_buckets(num_frames, height, width, buckets, pipeline.transformer.config)
        self.attach_pipeline(pipeline)
        # The training scheduler of the official finetune; same alphas as the shipped DDIM config.
        self.scheduler = diffusers.CogVideoXDPMScheduler.from_config(pipeline.scheduler.config)
        self.enable_vae_tiling = enable_vae_tiling
        if self.component_loaded("vae"):  # built in memory; a deferred VAE is configured as it loads
            self.configure_component("vae", self.vae)

    def configure_component(self, name: str, module) -> None:
        if name == "vae" and self.enable_vae_tiling:
            module.enable_slicing()
            module.enable_tiling()

    @classmethod
    def from_pipeline(cls, pipe, height: int, width: int, num_frames: int, max_sequence_length: int = 226,
                      path: str = "in-memory") -> "CogVideoX":
        """Wrap components built in memory (benchmarks with random real-size weights)."""
        return cls(path=path, height=height, width=width, num_frames=num_frames,
                   max_sequence_length=max_sequence_length, enable_vae_tiling=False, pipeline=pipe)

    @classmethod
    def local_checkpoint(cls, path: str, weights: bool = True) -> str:
        """The local folder of `path` (hub id, folder, or `tiny`: built once into the kit cache); `weights=False`:
        a hub id's configs and tokenizers only (`finetune.hub.resolve_pretrained`)."""
        from recipes.cogvideox.tiny import save_tiny_cogvideox

        return resolve_pretrained(path, family=cls.family_name, weights=weights,
                                  build_tiny=functools.partial(save_tiny_cogvideox, variant=cls.family_name))

    @classmethod
    def data_processor(cls, checkpoint: str, height: int = 480, width: int = 720, num_frames: int = 49,
                       buckets: list | None = None, max_sequence_length: int | None = None) -> Processor:
        """Clips in the training buckets, each (and the validation size) checked against the transformer config of
        `checkpoint` (the local folder, `local_checkpoint`); only the config is read. Image-to-video families
        (`conditioning_image`) get each clip's first frame too."""
        config = json.loads((Path(checkpoint) / "transformer" / "config.json").read_text())
        check_video_settings(height, width, num_frames, config)
        # the T5 tokens the pipeline's encode_prompt keeps (`max_sequence_length`), for the data report
        limit = TextLimit("T5", max_sequence_length, Path(checkpoint) / "tokenizer") if max_sequence_length else None
        return Processor(VideoSpec(buckets=video_buckets(num_frames, height, width, buckets, config),
                                   conditioning_image=cls.conditioning_image, one_frame=cls.one_frame_samples),
                         text_limit=limit)

    def cache_namespace(self) -> str:
        return (f"{self.family_name}|{self.path}|encoders={self.encoder_files()}|{self.dtype_name}"
                f"|{self.height}x{self.width}x{self.num_frames}|{self.buckets}|{self.max_sequence_length}"
                f"|vae_tiling={self.enable_vae_tiling}")

    # -- frozen encoders ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """`batch["video"]`: [B, F, C, H, W] in [-1, 1]; returns the VAE posterior's parameters
        (mean and logvar, so a cache still samples fresh latents each step) and T5 embeddings."""
        video = batch["video"].to(self.vae.device, self.vae.dtype).permute(0, 2, 1, 3, 4)  # [B, C, F, H, W]
        posterior = self.vae.encode(video).latent_dist
        prompt_embeds, _ = self.pipeline.encode_prompt(
            list(batch["prompt"]), do_classifier_free_guidance=False,
            max_sequence_length=self.max_sequence_length, device=self.text_encoder.device)
        return {"latent_mean": posterior.mean, "latent_logvar": posterior.logvar, "prompt_embeds": prompt_embeds}

    # -- objective ------------------------------------------------------------------------------
    def sample_latents(self, encoded: dict) -> torch.Tensor:
        """`latent_dist.sample() * scaling_factor` laid out [B, F, C, H, W]."""
        latents = sample_latents(encoded, self.component_config("vae").scaling_factor).permute(0, 2, 1, 3, 4)
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
        scale = self.pipeline.vae_scale_factor_spatial
        return self.pipeline._prepare_rotary_positional_embeddings(h * scale, w * scale, frames, latents.device)

    def conditioning(self, x_t: torch.Tensor, encoded: dict) -> tuple[torch.Tensor, dict]:
        """The transformer's input for the noisy latents and any extra keyword arguments. Text-to-video: the
        latents as they are; an image-to-video subclass concatenates the image latents on channels here (and
        CogVideoX1.5-I2V passes `ofs`)."""
        return x_t, {}

    def training_loss(self, encoded: dict, noise: torch.Tensor | None = None,
                      timesteps: torch.Tensor | None = None) -> torch.Tensor:
        x0 = self.sample_latents(encoded)
        dtype = self.transformer_dtype
        prompt_embeds, rotary = encoded["prompt_embeds"].to(dtype), self.rotary_embeddings(x0)

        def predict(x_t, t):
            hidden_states, extra = self.conditioning(x_t, encoded)
            return self.transformer(hidden_states=hidden_states.to(dtype), encoder_hidden_states=prompt_embeds,
                                    timestep=t, image_rotary_emb=rotary, return_dict=False, **extra)[0]

        return v_prediction_loss(predict, self.scheduler, x0, noise=noise, timesteps=timesteps)

    # -- sampling -------------------------------------------------------------------------------
    def generate_one(self, request: GenerationRequest, generator: torch.Generator, num_inference_steps: int = 50,
                     guidance_scale: float = 6.0, fps: int = 8) -> Sample:
        frames = self.pipeline(**self.prompt_arguments(request), height=self.height, width=self.width, num_frames=self.num_frames,
                           num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                           max_sequence_length=self.max_sequence_length, generator=generator,
                           output_type="np").frames[0]
        return Sample("video", (frames * 255).round().astype("uint8"), request.prompt, fps=fps)


class CogVideoX15(CogVideoX):
    """CogVideoX1.5-5B text-to-video: `CogVideoX` with 1.5's tiny model (its checkpoint and native size, 81 x 768 x
    1360, are settings: conf/model/cogvideox15.yaml). What 1.5 changes is read from its configs: latent frames
    patched in pairs (16N+1 frames, the first latent frame repeated to make the count even, as the official
    finetune) and rotary positions on the slice grid."""

    family_name = "cogvideox15"
    base_variant = "T2V 1.5"
