"""What every diffusers-pipeline family shares: the transformer is the trained network, LoRAs are
exported with the pipeline's own `save_lora_weights` (keys `transformer.*`, rank/alpha/targets in the
header's `lora_adapter_metadata`, so `load_lora_weights` restores the trained strength), full finetunes
are saved as the transformer in diffusers layout, and image samples come from the pipeline itself."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from finetune.family import ModelFamily, Sample


class DiffusersFamily(ModelFamily):
    """Subclasses call `attach_pipeline(pipe)` with the loaded diffusers pipeline."""

    def attach_pipeline(self, pipe) -> None:
        self.pipe = pipe
        pipe.set_progress_bar_config(disable=True)
        # nn.Module attributes so Lightning moves and checkpoints them; the pipeline shares them.
        self.transformer, self.vae, self.text_encoder = pipe.transformer, pipe.vae, pipe.text_encoder
        self.requires_grad_(False)

    def trainable_module(self) -> nn.Module:
        return self.transformer

    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(self.transformer, adapter_name=adapter_name)
        state = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        metadata = self.transformer.peft_config[adapter_name].to_dict()
        type(self.pipe).save_lora_weights(directory, transformer_lora_layers=state,
                                          transformer_lora_adapter_metadata=metadata)
        return Path(directory) / "pytorch_lora_weights.safetensors"

    def save_full(self, directory: str | os.PathLike) -> Path:
        """The transformer in the checkpoint's layout (`transformer/`): pass it to
        `Pipeline.from_pretrained(base, transformer=TransformerClass.from_pretrained(dir))`."""
        path = Path(directory) / "transformer"
        self.transformer.save_pretrained(path)
        return path

    @torch.no_grad()
    def generate_images(self, prompts: list[str], seed: int, **pipe_kwargs) -> list[Sample]:
        """One image per prompt at `self.height` x `self.width`; prompt i uses seed + i."""
        samples = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator(device="cpu").manual_seed(seed + i)
            image = self.pipe(prompt, height=self.height, width=self.width,
                              max_sequence_length=self.max_sequence_length, generator=generator,
                              **pipe_kwargs).images[0]
            samples.append(Sample("image", image, prompt))
        return samples
