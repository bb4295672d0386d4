"""Memory savers, each opt-in by config (`module.*`, `optimizer=*`; conf/train.yaml and conf/optimizer/ say what each
costs). Library implementations where there is one:

- FP8 weight storage of the frozen base: diffusers' layerwise casting (`ModelMixin.enable_layerwise_casting`), applied
  before the LoRA is added, so only the base layers are stored in float8 and upcast layer by layer for compute; the
  LoRA weights stay in fp32.
- 8-bit AdamW: bitsandbytes' `AdamW8bit` (`optimizer=adamw8bit`; CPU and CUDA).
- Optimizer state and step on the CPU: torchao's `CPUOffloadOptimizer` (`optimizer=adamw_cpu_offload`; CUDA only), or
  DeepSpeed's (`strategy=deepspeed_zero2_offload`).
- QLoRA, an NF4 base (`model.quantize_base=nf4`): quantized as the family loads it (bitsandbytes through diffusers'
  `BitsAndBytesConfig`, `recipes/diffusion/pipeline.py`); FP8 storage refuses such a base.
- Block swap (`module.blocks_to_swap=N`): the frozen weights of the last N transformer blocks live in (pinned) CPU
  memory and are copied to the accelerator just before each block runs (forward, and the recomputation in backward
  under gradient checkpointing), then dropped again: what musubi-tuner and diffusion-pipe offer for other video models.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

FP8_STORAGE = torch.float8_e4m3fn


def fp8_weight_storage(network: nn.Module, compute_dtype: torch.dtype) -> None:
    """Store the network's layer weights in float8 (e4m3) and upcast each layer to `compute_dtype` as it runs
    (diffusers' layerwise casting: its norms, embeddings and patch layers stay as they are). Call before adding LoRA."""
    if not hasattr(network, "enable_layerwise_casting"):
        raise ValueError(f"module.fp8_base=true: {type(network).__name__} is not a diffusers model (no "
                         f"enable_layerwise_casting); set module.fp8_base=false for this recipe.")
    if getattr(network, "is_quantized", False):
        raise ValueError("module.fp8_base=true with a quantized base (model.quantize_base=nf4): its weights already are "
                         "4-bit; set one of the two.")
    if any(p.requires_grad for p in network.parameters()):
        raise ValueError("module.fp8_base=true stores the frozen base in float8: it cannot train those weights "
                         "(adapter=full); use a LoRA adapter or set module.fp8_base=false.")
    network.enable_layerwise_casting(storage_dtype=FP8_STORAGE, compute_dtype=compute_dtype)


def _optional(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"{module} is not installed ({err}); install the kit's memory extra: "
                          f"pip install -e '.[{extra}]'") from None


def adamw_8bit(params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
               min_8bit_size: int = 4096):
    """bitsandbytes' AdamW with 8-bit (block-wise quantised) moments: 2 bytes per trainable parameter of optimizer
    state instead of 8. Tensors under `min_8bit_size` elements keep 32-bit state (bitsandbytes' default)."""
    bnb = _optional("bitsandbytes", "memory")
    return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                               min_8bit_size=min_8bit_size)


def adamw_cpu_offload(params, lr: float = 1e-4, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                      offload_gradients: bool = False):
    """torch's AdamW stepping on the CPU with its state in CPU memory (torchao's CPUOffloadOptimizer): the GPU holds
    no optimizer state. CUDA only."""
    if not torch.cuda.is_available():
        raise RuntimeError("optimizer=adamw_cpu_offload moves the optimizer state from a CUDA device to the CPU; "
                           "without a CUDA GPU use optimizer=adamw (the state already is in CPU memory).")
    optim = _optional("torchao.optim", "memory")
    return optim.CPUOffloadOptimizer(params, torch.optim.AdamW, offload_gradients=offload_gradients, lr=lr,
                                     betas=tuple(betas), eps=eps, weight_decay=weight_decay)


class BlockSwap:
    """Keep the frozen weights of `blocks` in CPU memory (pinned on a CUDA machine) and bring each block's to
    `device` just for its forward.

    A forward pre-hook copies a block's frozen parameters to the device (`param.data` rebound), a forward hook
    points them back at the CPU copy; autograd keeps what backward needs. Trainable parameters (LoRA) stay on the
    device with their gradients and optimizer state. The accelerator then holds the other blocks plus one swapped
    block at a time -- with gradient checkpointing, so that no block keeps its weights for backward: the
    recomputation in backward runs the same hooks. Costs a host-to-device copy of each swapped block's weights in
    forward and again in backward (PCIe bandwidth), partly hidden by `non_blocking` copies from pinned memory.
    """

    def __init__(self, blocks: list[nn.Module], device: torch.device):
        self.blocks, self.device = list(blocks), torch.device(device)
        self.handles = []
        self.host: dict[nn.Parameter, torch.Tensor] = {}
        self.resident: nn.Module | None = None  # the swapped block whose weights are on the device now
        for block in self.blocks:
            for param in block.parameters():
                if not param.requires_grad:
                    copy = param.data.to("cpu")
                    if self.device.type == "cuda":
                        copy = copy.pin_memory()
                    self.host[param] = copy
                    param.data = copy
            self.handles.append(block.register_forward_pre_hook(functools.partial(self._bring, block)))
            self.handles.append(block.register_forward_hook(functools.partial(self._send, block)))

    def _frozen(self, block: nn.Module):
        return [p for p in block.parameters() if p in self.host]

    def _bring(self, block: nn.Module, module, args) -> None:
        # The recomputation of a checkpointed block in backward stops as soon as it has what backward needs, before
        # the forward hook: a block may still be resident from there. At most one is.
        if self.resident is not None and self.resident is not block:
            self._send(self.resident)
        for param in self._frozen(block):
            param.data = self.host[param].to(self.device, non_blocking=True, copy=True)
        self.resident = block

    def _send(self, block: nn.Module, *hook_args) -> None:
        for param in self._frozen(block):
            param.data = self.host[param]
        if self.resident is block:
            self.resident = None

    def release(self) -> None:
        """Send the resident block back (after a step's backward)."""
        if self.resident is not None:
            self._send(self.resident)

    def remove(self, device: torch.device | None = None) -> None:
        """Remove the hooks; the weights go to `device` (None: they stay on the CPU)."""
        self.release()
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for param, host in self.host.items():
            param.data = host.to(device) if device is not None else host
        self.host = {}


def swap_blocks(family, count: int, device: torch.device) -> BlockSwap | None:
    """Block swap for the last `count` of the family's transformer blocks (0: none)."""
    if count <= 0:
        return None
    blocks = family.transformer_blocks()
    if count > len(blocks):
        raise ValueError(f"module.blocks_to_swap={count}: {type(family).__name__}'s network has {len(blocks)} "
                         f"transformer blocks; use at most {len(blocks)}.")
    return BlockSwap(blocks[len(blocks) - count:], device)
