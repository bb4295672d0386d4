"""Lightning's distributed strategies, made to work with a family's network and LoRA-only saves.

- `FSDP2Strategy` (`strategy=fsdp2`): Lightning's `ModelParallelStrategy` with every process one data-parallel
  shard; `FinetuneModule.configure_model` applies `torch.distributed.fsdp.fully_shard` to each of the family's
  transformer blocks (`ModelFamily.transformer_blocks`) and then to the network itself (`shard_family`).
  Runs on CPU with gloo as well as on GPUs with NCCL.
- `gathered_parameters`: whole parameters on every rank for a save, an export or a sample (FSDP1 summons them,
  ZeRO-3 gathers its partitions, FSDP2 swaps in the full tensors of its DTensor shards).
- `refuse_incomplete`: an export never writes an adapter with empty or still-sharded tensors (what ZeRO-3 gives
  when the partitions were not gathered: the anchors' "empty adapter" bug).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from torch import nn


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 (`fully_shard`) over all processes: every rank holds 1/world of each transformer block's parameters,
    gradients and optimizer state, and all-gathers a block just before it runs.

    Args:
        reshard_after_forward: free each block's gathered parameters after its forward (less memory; backward
            gathers them again: one more all-gather per block and step). False keeps them until backward.
        save_distributed_checkpoint: False: checkpoints are one file of whole trainable tensors written by rank 0
            (LoRA-only checkpoints stay small and load under any strategy). True: a folder with one shard per rank
            (faster for full finetunes of large models; resume with the same number of processes).
        process_group_backend: None picks NCCL on GPUs and gloo on CPUs.
    """

    def __init__(self, reshard_after_forward: bool = True, save_distributed_checkpoint: bool = False,
                 process_group_backend: str | None = None, **kwargs: Any):
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint,
                         process_group_backend=process_group_backend, **kwargs)
        self.fully_shard_options = {"reshard_after_forward": reshard_after_forward}

    def setup_environment(self) -> None:
        # Lightning's "auto" puts the processes of a node in a tensor-parallel group; here all of them shard data.
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def shard_family(family, mesh, reshard_after_forward: bool = True) -> list[nn.Module]:
    """`fully_shard` each of the family's transformer blocks, then its trainable network (the parameters outside
    the blocks: embeddings, norms, the output projection). Returns the blocks."""
    from torch.distributed.fsdp import fully_shard

    network = family.trainable_module()
    blocks = family.transformer_blocks()
    if not blocks:
        raise ValueError(f"strategy=fsdp2: {type(family).__name__} names no transformer block class "
                         f"(`block_class_names`), so there is nothing to shard block by block; use strategy=ddp.")
    if mesh.mesh_dim_names and "data_parallel" in mesh.mesh_dim_names:
        mesh = mesh["data_parallel"]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(network, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return blocks


def parameters_sharded(strategy) -> bool:
    """Whether a rank holds only a part of the parameters (FSDP1, FSDP2, ZeRO-3)."""
    if isinstance(strategy, (FSDPStrategy, ModelParallelStrategy)):
        return True
    return isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3


def forward_is_collective(strategy) -> bool:
    """Whether every rank must run the same forwards together (FSDP2 gathers each block in its forward hooks)."""
    return isinstance(strategy, ModelParallelStrategy)


def gathered_parameters(trainer, module: nn.Module, frozen: bool = True):
    """Every rank enters: inside, the module's parameters are whole on every rank (FSDP1 summons them, ZeRO-3
    gathers its partitions, FSDP2 swaps its DTensor shards for full tensors; `frozen=False` gathers only the
    trainable ones under FSDP2, e.g. for a LoRA export). DDP and single-device runs: nothing changes."""
    strategy = trainer.strategy
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        return FSDP.summon_full_params(strategy.model, writeback=False, recurse=True)
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None)
    if isinstance(strategy, ModelParallelStrategy):
        return full_tensors(module, frozen=frozen)
    return contextlib.nullcontext()


@contextlib.contextmanager
def full_tensors(module: nn.Module, frozen: bool = True):
    """FSDP2: replace each DTensor parameter by a plain parameter holding the full tensor (an all-gather: every rank
    enters, in the same order), and put the shards back on exit. Changes made inside are not written back."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for owner in module.modules():  # the shards registered (a no-op after a step: FSDP2 reshards after backward)
        if isinstance(owner, FSDPModule):
            owner.reshard()
    swapped = []
    try:
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if isinstance(param, DTensor) and (frozen or param.requires_grad):
                    whole = nn.Parameter(param.full_tensor().detach(), requires_grad=param.requires_grad)
                    owner._parameters[name] = whole
                    swapped.append((owner, name, param))
        yield
    finally:
        for owner, name, param in swapped:
            owner._parameters[name] = param


def refuse_incomplete(state: dict[str, torch.Tensor], what: str) -> None:
    """Stop before writing `what` when a tensor of `state` is empty (ZeRO-3's partitioned placeholders) or still a
    shard (an FSDP2 DTensor): the file would load without error and do nothing, or the wrong thing."""
    from torch.distributed.tensor import DTensor

    if not state:
        raise RuntimeError(f"{what}: the adapter has no tensors; nothing was written.")
    for name, tensor in state.items():
        if isinstance(tensor, DTensor) or tensor.numel() == 0:
            kind = "a shard (DTensor)" if isinstance(tensor, DTensor) else f"empty (shape {tuple(tensor.shape)})"
            raise RuntimeError(f"{what}: tensor {name} is {kind}: under a sharded strategy (fsdp, fsdp2, "
                               f"deepspeed_zero3) the parameters must be gathered first "
                               f"(finetune.strategies.gathered_parameters); nothing was written.")
