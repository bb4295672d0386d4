"""An exponential moving average (EMA) of the trained weights: updated after every optimizer step, kept in the
checkpoint (a resume continues it exactly), optionally used for the validation samples, and exported next to the
adapter as `export/ema/` (docs/tracking.md#ema)."""

from __future__ import annotations

import contextlib

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from finetune.checkpointing import CheckpointError


def effective_decay(decay: float, updates: int, warmup: bool = True) -> float:
    """The decay of update number `updates` (0 for the first): `min(decay, (1 + n) / (10 + n))` with the warm-up
    (diffusers' `EMAModel` without `use_ema_warmup`, timm's `ModelEmaV3` warm-up off), so the first updates follow
    the weights closely while the average holds mostly the random initialization; `decay` without it."""
    return min(decay, (1 + updates) / (10 + updates)) if warmup else decay


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The part of a parameter this rank holds: ZeRO-3's partition (`ds_tensor`), FSDP2's local shard, FSDP1's
    view of its flat shard, or the whole parameter (single device, DDP, ZeRO-1/2)."""
    partition = getattr(p, "ds_tensor", None)  # a parameter's attribute, not a family's
    if partition is not None:
        return partition
    data = p.data
    if torch.distributed.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(data, DTensor):
            return data.to_local()
    return data


class EMA(L.Callback):
    """`ema = decay_n * ema + (1 - decay_n) * weight` over exactly the trained parameters (`requires_grad`) after
    each optimizer step (not after the accumulating micro-batches), `decay_n = effective_decay(decay, n, warmup)`,
    in fp32 on the parameters' device, starting from the weights when training starts. Under sharded strategies
    (FSDP, FSDP2, ZeRO-3) each rank averages its own shard; the shards are gathered only where the weights are
    (the export, the samples: the EMA is swapped into the parameters, then the usual gather runs).

    Args:
        decay: 0 turns the EMA off (nothing is computed, saved or exported); e.g. 0.999.
        warmup: the `(1 + n) / (10 + n)` warm-up (see `effective_decay`).
        validate_with_ema: the validation samples are made with the EMA weights instead of the trained ones.
    """

    setting_ranges = {"decay": "[0, 1)"}

    def __init__(self, decay: float = 0.0, warmup: bool = True, validate_with_ema: bool = False):
        self.decay, self.warmup, self.validate_with_ema = float(decay), warmup, validate_with_ema
        self.shadow: dict[str, torch.Tensor] | None = None
        self.updates = 0
        self._step = -1  # the global step of the last update
        self._loaded: dict | None = None
        self._sharded = False
        self._trainer = self._module = None

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        from finetune.strategies import parameters_sharded

        self._sharded = parameters_sharded(trainer.strategy)
        self._trainer, self._module = trainer, module  # for `state_dict`, which Lightning calls without them

    @property
    def active(self) -> bool:
        return self.decay > 0

    @staticmethod
    def trained(module: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {name: p for name, p in module.named_parameters() if p.requires_grad}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # after the checkpoint is restored (the callback state, then the step counters) and the strategy set up
        if not self.active:
            return
        params = {name: local_tensor(p) for name, p in self.trained(module).items()}
        self._step, self.updates = trainer.global_step, 0
        if self._loaded is None:
            self.shadow = {name: t.detach().float().clone() for name, t in params.items()}
            return
        loaded, self._loaded = self._loaded, None
        shards = loaded["shadow"]
        if len(shards) != trainer.world_size:
            raise CheckpointError(f"the checkpoint's EMA (callbacks.ema) was kept by {len(shards)} processes, this "
                                  f"run has {trainer.world_size}: resume with as many, or callbacks.ema.decay=0.")
        shard = shards[trainer.global_rank]
        if set(shard) != set(params) or any(shard[k].shape != params[k].shape for k in params):
            raise CheckpointError("the checkpoint's EMA (callbacks.ema) holds other tensors than this run trains: "
                                  "pass the adapter settings it was trained with.")
        self.shadow = {name: shard[name].to(device=t.device, dtype=torch.float32) for name, t in params.items()}
        self.updates = int(loaded["updates"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.catch_up(trainer, module)

    @torch.no_grad()
    def catch_up(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        """Update once if an optimizer step happened since the last update: the global step counts optimizer steps
        only, so micro-batches that accumulate gradients change nothing. Whoever reads the EMA calls it first,
        whatever the order of the callbacks."""
        if self.shadow is None or trainer.global_step == self._step:
            return
        self._step = trainer.global_step
        d = effective_decay(self.decay, self.updates, self.warmup)
        for name, p in self.trained(module).items():
            self.shadow[name].mul_(d).add_(local_tensor(p).float(), alpha=1 - d)
        self.updates += 1

    def state_dict(self) -> dict:
        """Plain tensors and numbers (the checkpoint loads with weights_only=True): one dict of CPU tensors per
        rank, gathered from every rank when the parameters are sharded (every rank builds the checkpoint dict)."""
        if self.shadow is None:
            return {}
        # a checkpoint written before this callback's own on_train_batch_end ran for the step (Lightning runs checkpoint
        # callbacks last, but a user's callback may save earlier) still holds the step's update
        if self._trainer is not None:
            self.catch_up(self._trainer, self._module)
        mine = {name: t.detach().cpu().clone() for name, t in self.shadow.items()}
        shards = [mine]
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and self._sharded:
            shards = [None] * dist.get_world_size()
            dist.all_gather_object(shards, mine)
        return {"decay": self.decay, "updates": self.updates, "shadow": shards}

    def load_state_dict(self, state_dict: dict) -> None:
        if self.active and state_dict:
            self._loaded = state_dict

    @contextlib.contextmanager
    def swapped_in(self, trainer: L.Trainer, module: L.LightningModule):
        """The EMA in the trained parameters (this rank's shard of each), the trained weights back afterwards."""
        self.catch_up(trainer, module)
        params = {name: local_tensor(p) for name, p in self.trained(module).items()}
        with torch.no_grad():
            saved = {name: t.clone() for name, t in params.items()}
            for name, t in params.items():
                t.copy_(self.shadow[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, t in params.items():
                    t.copy_(saved[name])


def find_ema(trainer: L.Trainer) -> EMA | None:
    """The run's EMA callback when it is on (engine code: callbacks are found by type)."""
    return next((c for c in trainer.callbacks if isinstance(c, EMA) and c.active and c.shadow is not None), None)


@contextlib.contextmanager
def ema_weights(trainer: L.Trainer, module: L.LightningModule):
    """Inside, the trained parameters hold the EMA (yields True), or, without an EMA, are left as they are (yields
    False). Every rank enters; under sharded strategies enter it outside `finetune.callbacks.full_parameters`."""
    ema = find_ema(trainer)
    if ema is None:
        yield False
        return
    with ema.swapped_in(trainer, module):
        yield True


def validation_weights(trainer: L.Trainer, module: L.LightningModule):
    """`ema_weights` when the EMA is on and asked for the samples (`callbacks.ema.validate_with_ema`), else
    nothing."""
    ema = find_ema(trainer)
    if ema is None or not ema.validate_with_ema:
        return contextlib.nullcontext(False)
    rank_zero_info(f"validation samples for step {trainer.global_step}: with the EMA weights")
    return ema_weights(trainer, module)
