"""What is trained: a LoRA adapter (through peft) or the full network (SFT)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
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
        modules: submodules trained fully next to the LoRA (matched as in `Full`; peft `modules_to_save`, so they
            are saved in the adapter), e.g. CogVLM's ViT MLPs of layers 46-54 in the official captcha finetune.
    """

    setting_ranges = {"rank": ">=1", "alpha": ">0", "dropout": "[0, 1)"}  # checked by finetune.settings.check

    rank: int = 128
    alpha: float = 64
    target_modules: list[str] | None = None
    init_lora_weights: bool | str = True
    dropout: float = 0.0
    adapter_name: str = "default"
    modules: list[str] | None = None

    def apply(self, module: nn.Module, default_targets: tuple[str, ...]) -> None:
        from peft import LoraConfig

        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                            init_lora_weights=self.init_lora_weights,
                            target_modules=list(self.target_modules or default_targets),
                            modules_to_save=matching_modules(module, self.modules) if self.modules else None)
        if hasattr(module, "add_adapter"):
            module.add_adapter(config, adapter_name=self.adapter_name)
        else:  # plain nn.Module: inject in place, the same layers and key names as add_adapter
            from peft import inject_adapter_in_model

            inject_adapter_in_model(config, module, adapter_name=self.adapter_name)
        keep_trainable_in_fp32(module)

    def can_disable(self, step: int) -> bool:
        """A LoRA can be switched off at any step: the base weights are never changed."""
        return True

    @contextlib.contextmanager
    def disabled(self, module: nn.Module, step: int = 0) -> Iterator[None]:
        """Inside, `module` (the network `apply` adapted) computes as the untrained base model: every peft layer's
        adapters are off (LoRA layers pass through their base layer, `modules` their original copies). On leaving,
        the adapters are on again and every parameter's `requires_grad` is as it was (peft toggles it)."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        layers = [m for m in module.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]
        grads = [(p, p.requires_grad) for p in module.parameters()]
        try:
            for layer in layers:
                layer.enable_adapters(False)
            yield
        finally:
            for layer in layers:
                layer.enable_adapters(True)
            for param, flag in grads:
                param.requires_grad_(flag)


@dataclass
class Full:
    """Full finetune (SFT) of the trainable network, or of the submodules named in `modules`
    (a name matches a submodule whose qualified name contains it)."""

    modules: list[str] | None = field(default=None)

    def apply(self, module: nn.Module, default_targets: tuple[str, ...]) -> None:
        if not self.modules:
            module.requires_grad_(True)
        for name in matching_modules(module, self.modules) if self.modules else ():
            module.get_submodule(name).requires_grad_(True)
        keep_trainable_in_fp32(module)

    def can_disable(self, step: int) -> bool:
        """Only before the first step: a full finetune changes the base weights themselves."""
        return step == 0

    @contextlib.contextmanager
    def disabled(self, module: nn.Module, step: int = 0) -> Iterator[None]:
        """At step 0 the network is the untrained model: nothing to switch off. Later there is no untrained copy."""
        if not self.can_disable(step):
            raise ValueError(f"step {step}: a full finetune keeps no untrained copy of the network to compute with")
        yield


def matching_modules(module: nn.Module, names: list[str]) -> list[str]:
    """Qualified names of the outermost submodules whose name contains one of `names`."""
    matched = [name for name, _ in module.named_modules() if name and any(s in name for s in names)]
    if not matched:
        raise ValueError(f"adapter.modules={list(names)} matches no submodule of {type(module).__name__}")
    return [name for name in matched if not any(name.startswith(m + ".") for m in matched)]


def merged_state_dict(model: nn.Module, adapter_name: str = "default",
                      dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The state dict in the un-adapted model's key names with each LoRA folded into its weight (peft's own
    delta, `alpha / r * B @ A`) and peft's fully trained copies (`modules_to_save`) in place of their
    originals; in `dtype`, or each base tensor's own dtype. The model itself is not changed."""
    from peft.tuners.lora import LoraLayer

    deltas = {f"{name}.weight": module.get_delta_weight(adapter_name).float() for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and adapter_name in module.lora_A}
    state = {}
    for key, value in model.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = key.replace(".base_layer.", ".")
        if ".modules_to_save." in key:  # <module>.modules_to_save.<adapter>.<param> -> <module>.<param>
            module, rest = key.split(".modules_to_save.")
            adapter, param = rest.split(".", 1)
            if adapter != adapter_name:
                continue
            key = f"{module}.{param}"
        out_dtype = dtype or value.dtype
        value = value.detach().float() + deltas[key].to(value.device) if key in deltas else value.detach()
        state[key] = value.to("cpu", out_dtype).contiguous()
    return state


def keep_trainable_in_fp32(module: nn.Module) -> None:
    """Trainable parameters in fp32 when the base runs in bf16/fp16: updates of lr*grad ~ 1e-6 vanish
    in bf16's 8-bit mantissa."""
    for param in module.parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.float32)
