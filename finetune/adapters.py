"""What is trained: a LoRA adapter (through peft) or the full network (SFT)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class LoRA:
    """LoRA through peft's `add_adapter`.

    Args:
        rank: higher fits more and costs memory (official CogVideoX recipe: 128).
        alpha: the update is scaled by alpha / rank (official: 64; diffusers reads it back from the
            exported metadata).
        target_modules: module names to adapt; None takes the family's official default.
        init_lora_weights: peft's init (True: B = 0, so training starts from the base model).
        dropout: LoRA dropout.
    """

    rank: int = 128
    alpha: float = 64
    target_modules: list[str] | None = None
    init_lora_weights: bool | str = True
    dropout: float = 0.0
    adapter_name: str = "default"

    def apply(self, module: nn.Module, default_targets: tuple[str, ...]) -> None:
        from peft import LoraConfig

        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            init_lora_weights=self.init_lora_weights,
                            target_modules=list(self.target_modules or default_targets))
        if hasattr(module, "add_adapter"):
            module.add_adapter(config, adapter_name=self.adapter_name)
        else:  # plain nn.Module: inject in place, the same layers and key names as add_adapter
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, module, adapter_name=self.adapter_name)
        keep_trainable_in_fp32(module)

    @property
    def is_lora(self) -> bool:
        return True


@dataclass
class Full:
    """Full finetune (SFT) of the trainable network, or of the submodules named in `modules`
    (a name matches a submodule whose qualified name contains it)."""

    modules: list[str] | None = field(default=None)

    def apply(self, module: nn.Module, default_targets: tuple[str, ...]) -> None:
        if not self.modules:
            module.requires_grad_(True)
        else:
            matched = [m for name, m in module.named_modules() if any(s in name for s in self.modules)]
            if not matched:
                raise ValueError(f"adapter.modules={self.modules} matches no submodule of {type(module).__name__}")
            for m in matched:
                m.requires_grad_(True)
        keep_trainable_in_fp32(module)

    @property
    def is_lora(self) -> bool:
        return False


def keep_trainable_in_fp32(module: nn.Module) -> None:
    """Trainable parameters in fp32 when the base runs in bf16/fp16: updates of lr*grad ~ 1e-6 vanish
    in bf16's 8-bit mantissa."""
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
