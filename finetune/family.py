"""The one interface between the engine and a model family.

The engine (`finetune.module.FinetuneModule`, the callbacks, `train.py`) never asks which model it
trains. Everything model-specific -- loading, the objective, sampling, export -- sits in one subclass of
`ModelFamily` per family under `recipes/`. Adding a model is one module there plus its configs.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn


@dataclass
class Sample:
    """One generated validation sample: `kind` is "video" (list of HxWx3 uint8 frames), "image" (PIL
    image) or "text" (a string); `caption` is the prompt or label shown next to it."""

    kind: str
    data: Any
    caption: str
    fps: int = 8


DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
          "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[str(name)]
    except KeyError:
        raise ValueError(f"model.dtype={name!r} is not supported; use one of {sorted(DTYPES)}") from None


class ModelFamily(nn.Module, ABC):
    """Model-specific code behind a small interface.

    Subclasses hold the frozen components and the trainable `denoiser` (or language model) as
    submodules, so Lightning moves them to the device and the engine can add adapters to them.
    """

    #: default LoRA targets, rank and alpha of the official recipe for this family
    lora_target_modules: tuple[str, ...] = ()

    @abstractmethod
    def trainable_module(self) -> nn.Module:
        """The network that LoRA is added to or that is fully finetuned."""

    @abstractmethod
    def encode(self, batch: dict) -> dict[str, torch.Tensor]:
        """Frozen encoders: turn a raw batch into per-sample tensors (cacheable, no gradients)."""

    @abstractmethod
    def training_loss(self, encoded: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective on an encoded batch (a scalar)."""

    def cache_namespace(self) -> str:
        """Identifies everything `encode` depends on besides the sample (model, resolution)."""
        raise NotImplementedError(f"{type(self).__name__} does not support a latent cache")

    def generate(self, prompts: list[str], seed: int, **kwargs) -> list[Sample]:
        """Validation samples from the current weights."""
        return []

    def evaluate(self, batch: dict) -> dict[str, float]:
        """Validation metrics on a batch of the validation split (families with a metric)."""
        return {}

    def last_predictions(self) -> list[dict]:
        """Per-sample results of the latest `evaluate` call, e.g. {"key", "label", "prediction", "acc"}, for
        prediction tables (`finetune.callbacks.PredictionsTable`)."""
        return []

    def load_adapter(self, path: str | os.PathLike, adapter_name: str = "default") -> None:
        """Load an adapter written by `save_lora` into the trainable network (`adapter_path=DIR`)."""
        raise NotImplementedError(f"{type(self).__name__} cannot load an exported adapter (adapter_path); "
                                  f"evaluate a training checkpoint with ckpt_path instead")

    @abstractmethod
    def save_lora(self, directory: str | os.PathLike, adapter_name: str = "default") -> Path:
        """Write the adapter in the format the ecosystem loads; returns the written file or dir."""

    @abstractmethod
    def save_full(self, directory: str | os.PathLike) -> Path:
        """Write the trained network in the layout of the published checkpoints."""

    def enable_gradient_checkpointing(self) -> None:
        module = self.trainable_module()
        if hasattr(module, "enable_gradient_checkpointing"):
            module.enable_gradient_checkpointing()
        else:
            module.gradient_checkpointing_enable()

    def on_train_mode(self) -> None:
        """Keep frozen parts in eval mode (dropout off) whatever Lightning does with `train()`."""
        self.eval()
        self.trainable_module().train()
