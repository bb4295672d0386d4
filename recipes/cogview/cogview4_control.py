"""CogView4 control (`CogView4ControlPipeline`, THUDM/CogView4-6B-Control): CogView4 conditioned on a control image
(canny edges, depth, ...) whose latents are concatenated with the noisy latents on channels.

Objective: CogView4's flow matching unchanged (recipes/cogview/cogview4.py: the unshifted timestep, the
resolution-dependent shift, the per-sample prompt mask), with the transformer's input `cat([x_t, c], dim=1)`, where
`c` are the control image's latents exactly as diffusers 0.42.1 `CogView4ControlPipeline.__call__` makes them:
the image in [-1, 1] at the sample's size (`prepare_image`: `VaeImageProcessor.preprocess`), `vae.encode(...)
.latent_dist.sample()`, minus a shift of 0, times `vae.config.scaling_factor`. Training draws `c` from the cached
posterior each step, as the pipeline draws it once per call (pinned by a test that records the pipeline's input).

Two starts (docs/cogview.md#cogview4-control):
- `THUDM/CogView4-6B-Control`: the patch embedding already takes 32 channels (16 image + 16 control). LoRA trains
  the attention projections (to_q, to_k, to_v, to_out.0); SFT the whole transformer.
- `THUDM/CogView4-6B`: the patch embedding `patch_embed.proj` is widened from 16 x 2 x 2 = 64 to 128 input features,
  the new (control) weights zero, so step 0 is the base model exactly (the control is ignored until it trains); as
  in the diffusers example `examples/cogview4-control` and finetrainers' control trainer. LoRA then trains the widened
  `patch_embed.proj` fully beside the LoRA (`adapter.modules=[patch_embed.proj]`, PEFT's `modules_to_save`), SFT the
  whole transformer. The widened embedding is saved in every export (the config's `in_channels=32`), so an export of
  this start loads like one of the control checkpoint.

Exports that stock diffusers loads (`CogView4ControlPipeline` has no LoRA loader mixin, so no `load_lora_weights`):
`export/transformer/` is the control transformer with the LoRA fused (`CogView4Transformer2DModel.from_pretrained`,
then `CogView4ControlPipeline.from_pretrained(base, transformer=...)`); `export/pytorch_lora_weights.safetensors`
is the LoRA (diffusers key names, alpha folded, plus the fully trained `patch_embed.proj` of the from-base start) for
`adapter_path`, `cogft merge` and `apply_control_lora` (PEFT onto a loaded pipeline):
docs/lora-formats.md#cogview4-control.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from finetune.adapters import LoRA, merged_state_dict
from finetune.data import DataError, ImageSpec, Processor
from finetune.family import GenerationRequest, Sample
from finetune.lora_formats.files import query_widths
from finetune.settings.check import ConfigError
from recipes.cogview.cogview4 import CogView4
from recipes.diffusion.objectives import sample_latents
from recipes.diffusion.pipeline import LORA_FILE

PATCH_PROJ = "patch_embed.proj"


def widen_patch_embedding(transformer: nn.Module) -> None:
    """`patch_embed.proj` from `in_channels` to `2 * in_channels` latent channels (the config's `in_channels` too),
    the new input features zero: the output is the old one for any control latents. A patch's features are laid out
    channel-major (`CogView4PatchEmbed.forward`: `(C, p, p)` flattened), so the image channels keep the first
    `C * p * p` columns."""
    proj, config = transformer.patch_embed.proj, transformer.config
    old = config.in_channels * config.patch_size**2
    if proj.in_features != old or config.out_channels != config.in_channels:
        raise ValueError(f"widen_patch_embedding: the transformer already takes {config.in_channels} channels "
                         f"({proj.in_features} patch features); only a base CogView4 (in_channels == out_channels) "
                         f"is widened.")
    wide = nn.Linear(2 * old, proj.out_features, bias=proj.bias is not None, device=proj.weight.device,
                     dtype=proj.weight.dtype)
    with torch.no_grad():
        wide.weight.zero_()
        wide.weight[:, :old] = proj.weight
        if proj.bias is not None:
            wide.bias.copy_(proj.bias)
    wide.requires_grad_(proj.weight.requires_grad)
    transformer.patch_embed.proj = wide
    transformer.register_to_config(in_channels=2 * config.in_channels)


def _lora_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {LORA_FILE}; pass a CogView4 control LoRA export (run_dir/export) or its "
                                f"file.")
    return file


def _full_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of fully trained modules (PEFT's `modules_to_save`: the widened `patch_embed.proj`)."""
    return {k: v for k, v in state.items() if ".lora_" not in k}


@torch.no_grad()
def _put_full_tensors(transformer: nn.Module, tensors: dict[str, torch.Tensor], scale: float = 1.0,
                      blend: bool = False) -> None:
    """Copy fully trained weights into `transformer` (widening its patch embedding first where the file's is wider):
    replaced, or with `blend` `W + scale * (W_trained - W)`."""
    wide = tensors.get(f"{PATCH_PROJ}.weight")
    if wide is not None and wide.shape[1] == 2 * transformer.patch_embed.proj.in_features:
        widen_patch_embedding(transformer)
    for key, value in tensors.items():
        module_name, param = key.rsplit(".", 1)
        try:
            target = getattr(transformer.get_submodule(module_name), param)
        except AttributeError:
            raise ValueError(f"the LoRA holds {key!r}, which this transformer does not have: it was trained for "
                             f"another model.") from None
        if target.shape != value.shape:
            raise ValueError(f"the LoRA's {key} is {tuple(value.shape)}, this transformer's {tuple(target.shape)}: it "
                             f"was trained for another model.")
        value = value.to(target.device, torch.float32)
        new = target.float() + scale * (value - target.float()) if blend else value
        target.copy_(new.to(target.dtype))


def apply_control_lora(pipe, path: str | os.PathLike, adapter_name: str = "control"):
    """Apply a CogView4 control LoRA (the kit's `export/` folder or its `pytorch_lora_weights.safetensors`) to a
    loaded `CogView4ControlPipeline` through PEFT, in one call; returns the pipeline.

    The LoRA pairs become a PEFT adapter `adapter_name` on `pipe.transformer` at the trained strength (the file's
    alpha/rank is folded into lora_B, its header says r = alpha; `pipe.transformer.set_adapters` and
    `disable_adapters` work as for any diffusers PEFT model). A from-base LoRA's fully trained patch embedding
    (128 input features) replaces the transformer's, widened first if it is a base CogView4's::

        from diffusers import CogView4ControlPipeline
        from recipes.cogview.cogview4_control import apply_control_lora

        pipe = CogView4ControlPipeline.from_pretrained("THUDM/CogView4-6B-Control", dtype=torch.bfloat16)
        apply_control_lora(pipe, "runs/my_canny/export")
        image = pipe(prompt, control_image=canny, guidance_scale=3.5).images[0]
    """
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    file = _lora_file(path)
    with safe_open(str(file), framework="pt") as f:
        header = json.loads((f.metadata() or {}).get("lora_adapter_metadata", "{}"))
        state = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    meta = {k.removeprefix("transformer."): v for k, v in header.items()}
    full = _full_tensors(state)
    lora = {k: v for k, v in state.items() if k not in full}
    transformer = pipe.transformer
    _put_full_tensors(transformer, full)
    if lora:
        modules = sorted({k.split(".lora_")[0] for k in lora})
        rank = int(meta.get("r") or next(v.shape[0] for k, v in lora.items() if ".lora_A." in k))
        config = LoraConfig(r=rank, lora_alpha=float(meta.get("lora_alpha", rank)), target_modules=modules)
        transformer.add_adapter(config, adapter_name=adapter_name)
        result = set_peft_model_state_dict(transformer, lora, adapter_name=adapter_name)
        if result.unexpected_keys:
            raise ValueError(f"{file}: {len(result.unexpected_keys)} tensors fit no module of this transformer, e.g. "
                             f"{result.unexpected_keys[0]}: it was trained for another model.")
    return pipe


class CogView4Control(CogView4):
    """CogView4 control: text-to-image conditioned on a control image (`CogView4ControlPipeline`).

    Args:
        path: `THUDM/CogView4-6B-Control` (32-channel patch embedding), `THUDM/CogView4-6B` (a base checkpoint: its
            patch embedding is widened, the control weights zero), a local folder of either, `tiny` (a tiny control
            checkpoint) or `tiny-base` (the tiny CogView4, for the from-base start).
        The other settings are CogView4's (recipes/cogview/cogview4.py).
    """

    base_variant = "Control"
    pipeline_class = "CogView4ControlPipeline"
    patch_features = 128  # 32 channels x 2 x 2: a LoRA that carries a patch embedding this wide is a control one

    @classmethod
    def recognize_lora(cls, shapes: dict[str, tuple[int, ...]]) -> str | None:
        """A CogView4 LoRA (hidden size 4096) that carries a 128-feature patch embedding (the from-base start's widened
        `patch_embed.proj`); a control LoRA of attention layers only has the shapes of any CogView4 LoRA."""
        patch = [shape for key, shape in shapes.items() if key.endswith(f"{PATCH_PROJ}.weight")]
        if patch and patch[0][-1] == cls.patch_features and query_widths(shapes) <= {4096}:
            return "CogView4-6B-Control"
        return None

    @classmethod
    def local_checkpoint(cls, path: str, weights: bool = True) -> str:
        """`tiny`: the tiny control checkpoint (recipes/cogview/cogview4_control_tiny.py); `tiny-base`: the tiny
        CogView4;
        else as CogView4 (a hub id or folder of either start)."""
        from finetune.hub import resolve_pretrained
        from recipes.cogview.cogview4_control_tiny import save_tiny_cogview4_control

        if path == "tiny-base":
            return CogView4.local_checkpoint("tiny", weights=weights)
        if path == "tiny":
            return resolve_pretrained(path, family="cogview4_control", build_tiny=save_tiny_cogview4_control)
        return CogView4.local_checkpoint(path, weights=weights)

    @classmethod
    def data_processor(cls, height: int = 1024, width: int = 1024, bucket_pixels: int = 1024 * 1024,
                       min_side: int = 512, max_side: int = 2048, bucket_multiple: int = 32,
                       max_pixels: int = 2**21, checkpoint: str | None = None,
                       max_sequence_length: int | None = None) -> Processor:
        """CogView4's buckets, with a control image per sample in the same bucket (`data.control`)."""
        base = super().data_processor(height=height, width=width, bucket_pixels=bucket_pixels, min_side=min_side,
                                      max_side=max_side, bucket_multiple=bucket_multiple, max_pixels=max_pixels,
                                      checkpoint=checkpoint, max_sequence_length=max_sequence_length)
        return Processor(ImageSpec(**{**base.spec.__dict__, "control_image": True}), text_limit=base.text_limit)

    def __init__(self, path: str = "THUDM/CogView4-6B-Control", dtype: str = "bf16", height: int = 1024,
                 width: int = 1024, max_sequence_length: int = 1024, sigma_sampling: str = "uniform",
                 logit_mean: float = 0.0, logit_std: float = 1.0, loss_weighting: str = "none",
                 bucket_pixels: int = 1024 * 1024, min_side: int = 512, max_side: int = 2048,
                 bucket_multiple: int = 32, max_pixels: int = 2**21, quantize_base: str | None = None,
                 pipeline=None, checkpoint: str | None = None):
        from diffusers import CogView4ControlPipeline

        # CogView4 loads the checkpoint's components (the control one's or a base one's) with `local_checkpoint` above
        super().__init__(path=path, dtype=dtype, height=height, width=width, max_sequence_length=max_sequence_length,
                         sigma_sampling=sigma_sampling, logit_mean=logit_mean, logit_std=logit_std,
                         loss_weighting=loss_weighting, bucket_pixels=bucket_pixels, min_side=min_side,
                         max_side=max_side, bucket_multiple=bucket_multiple, max_pixels=max_pixels,
                         quantize_base=quantize_base, pipeline=pipeline, checkpoint=checkpoint)
        config = self.transformer.config
        #: True: started from a base CogView4 whose patch embedding was widened here (its control weights zero)
        self.widened = config.in_channels == config.out_channels
        if self.widened:
            widen_patch_embedding(self.transformer)
        self.widened_checked = False
        # the deferred VAE and text encoder stay unloaded (their meta placeholders): docs/memory.md#lazy-encoders
        self.attach_pipeline(CogView4ControlPipeline(**self.pipeline_components()))

    def cache_namespace(self) -> str:
        return "control|" + super().cache_namespace()

    # -- frozen encoders ------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """CogView4's encodings and the control image's VAE posterior (`batch["control_image"]`: [B, 3, H, W] in
        [-1, 1], the image's bucket), kept as mean and logvar so every step draws fresh control latents as the
        pipeline's `latent_dist.sample()` does."""
        if "control_image" not in batch:
            raise DataError("the CogView4 control recipes need a control image per sample: set data.control (pairs, "
                            "canny or depth_from_file; docs/cogview.md#cogview4-control).")
        encoded = super().encode(batch)
        control = self.vae.encode(batch["control_image"].to(self.vae.device, self.vae.dtype)).latent_dist
        return {**encoded, "control_mean": control.mean, "control_logvar": control.logvar}

    def control_latents(self, encoded: dict) -> torch.Tensor:
        """`(latent_dist.sample() - 0) * scaling_factor`: `CogView4ControlPipeline.__call__`'s control latents."""
        return sample_latents({"latent_mean": encoded["control_mean"], "latent_logvar": encoded["control_logvar"]},
                              self.component_config("vae").scaling_factor)

    def transformer_input(self, x_t: torch.Tensor, encoded: dict) -> torch.Tensor:
        """`cat([x_t, control latents], dim=1)`, the pipeline's `latent_model_input`."""
        self.check_widened_trains()
        return torch.cat([x_t, self.control_latents(encoded).to(x_t)], dim=1)

    def check_widened_trains(self) -> None:
        """From a base checkpoint, a LoRA that leaves the widened patch embedding frozen never sees the control (its
        weights stay zero): one clear line at the first training step."""
        if self.widened_checked or not (self.widened and torch.is_grad_enabled()):
            return
        self.widened_checked = True
        if not any(p.requires_grad for p in self.transformer.patch_embed.proj.parameters()):
            raise ConfigError(f"model.path={self.path!r} is a base CogView4 checkpoint: its patch embedding was "
                              f"widened for the control channels (zero weights) and must train, or the control is "
                              f"ignored. Add adapter.modules=[{PATCH_PROJ}] (or start from THUDM/CogView4-6B-Control).")

    # -- export and reload ------------------------------------------------------------------------
    def export(self, directory: str | os.PathLike, adapter, record: dict | None = None) -> Path:
        """LoRA: `pytorch_lora_weights.safetensors` (with the fully trained patch embedding of the from-base start) and
        `transformer/`, the control transformer with the LoRA fused; full finetune: `transformer/`. Either
        `transformer/` loads with `CogView4Transformer2DModel.from_pretrained` into `CogView4ControlPipeline`."""
        if not isinstance(adapter, LoRA):
            return self.write_transformer(directory)
        file = self.write_lora_weights(directory, adapter.adapter_name, self.model_record(record))
        full = self.full_state(adapter.adapter_name)
        if full:  # write_adapter keeps LoRA pairs only: the fully trained modules go beside them, same key prefix
            from safetensors import safe_open
            from safetensors.torch import save_file

            with safe_open(str(file), framework="pt") as f:
                header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
            tensors.update({f"transformer.{k}": v for k, v in full.items()})
            save_file(tensors, str(file), metadata=header)
        self.write_fused_transformer(Path(directory) / "transformer", adapter.adapter_name)
        return file

    def lora_state(self, adapter_name: str) -> tuple[dict[str, torch.Tensor], dict]:
        """The LoRA pairs only (what the LoRA file formats hold); the fully trained modules: `full_state`."""
        state, config = super().lora_state(adapter_name)
        full = _full_tensors(state)
        return {k: v for k, v in state.items() if k not in full}, config

    def full_state(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The adapter's fully trained modules (PEFT's `modules_to_save`: the from-base start's `patch_embed.proj`)."""
        return _full_tensors(super().lora_state(adapter_name)[0])

    def write_fused_transformer(self, path: Path, adapter_name: str = "default") -> Path:
        """The transformer with the LoRA folded into its weights (`finetune.adapters.merged_state_dict`), in diffusers
        layout, built on the meta device so only the merged tensors take memory."""
        import diffusers

        state = merged_state_dict(self.transformer, adapter_name)
        transformer_class = getattr(diffusers, type(self.transformer).__name__)
        with torch.device("meta"):
            fused = transformer_class.from_config(self.transformer.config)
        fused.load_state_dict(state, assign=True, strict=True)
        fused.save_pretrained(path)
        return path

    def merge_loras(self, loras: list[tuple[str, float]], blend_full_modules: bool = False) -> list[dict]:
        """The LoRA pairs as CogView4's (`W + s * alpha / rank * B @ A`), then each file's fully trained patch embedding
        (the from-base start's), replacing the base's (or, with `blend_full_modules`, `W + s * (W_trained - W)`)."""
        from finetune.lora_formats.files import read_lora_file

        record = super().merge_loras(loras, blend_full_modules)
        for (path, scale), entry in zip(loras, record):
            file = read_lora_file(path)
            full = _full_tensors({k.removeprefix("transformer."): v for k, v in file.tensors.items()
                                  if not k.endswith(".alpha")})
            _put_full_tensors(self.transformer, full, scale, blend_full_modules)
            entry["full_modules"] = sorted({k.rsplit(".", 1)[0] for k in full})
        return record

    @classmethod
    def model_card_usage(cls, base: str, repo_id: str, files: list[str]) -> list[str] | None:
        """`CogView4ControlPipeline` has no `load_lora_weights`: the fused transformer, or `apply_control_lora`."""
        return ["diffusers (`CogView4ControlPipeline` has no LoRA loader; the export's `transformer/` is the LoRA "
                "fused):", "", "```python", "import torch",
                "from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel", "",
                f'transformer = CogView4Transformer2DModel.from_pretrained("{repo_id}", subfolder="transformer", '
                f'torch_dtype=torch.bfloat16)',
                f'pipe = CogView4ControlPipeline.from_pretrained("{base}", transformer=transformer, '
                f'torch_dtype=torch.bfloat16)', "```", "",
                "Or the LoRA through PEFT: `recipes.cogview.cogview4_control.apply_control_lora(pipe, path)`.", ""]

    # -- sampling -------------------------------------------------------------------------------
    def generate_one(self, request: GenerationRequest, generator: torch.Generator, num_inference_steps: int = 50,
                     guidance_scale: float = 3.5) -> Sample:
        """An image at `self.height` x `self.width` from the request's `control_image` (a path or PIL image; the
        pipeline resizes it to the sample's size), which is kept as the sample's condition (saved and logged next
        to it)."""
        from PIL import Image

        source = request.media.get("control_image", request.image)
        if source is None:
            raise ValueError(f"callbacks.samples.prompts: {request.prompt!r} has no control_image; give each entry as "
                             f"{{prompt: ..., control_image: PATH}}.")
        control = (source if isinstance(source, Image.Image) else Image.open(source)).convert("RGB")
        image = self.pipeline(**self.prompt_arguments(request), control_image=control, height=self.height, width=self.width,
                          max_sequence_length=self.max_sequence_length, generator=generator,
                          num_inference_steps=num_inference_steps, guidance_scale=guidance_scale).images[0]
        return Sample("image", image, request.prompt, condition=control)
