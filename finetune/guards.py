"""Stop a run that has stopped learning anything: a non-finite loss or gradient.

A NaN from a too-high learning rate poisons every later step; without a check the run trains to the end,
exits 0 and exports NaN weights. `NonFiniteGuard` finds the first bad step and, by default, stops the run
there (naming the step, its samples and the last good checkpoint) before any checkpoint or export holds the
bad weights. `policy=skip` drops bad steps instead (the optimizer leaves every weight as it was) and stops
after `max_skipped` of them.
"""

from __future__ import annotations

from collections import deque

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from finetune.errors import UserError


class TrainingFailed(UserError, RuntimeError):
    """The run produced nothing useful; the message says why and what to do."""


class NonFiniteGuard(L.Callback):
    """Args:
        policy: `stop` (default): end the run at the first non-finite loss or gradient, exit non-zero, write no
            checkpoint or export of the bad weights. `skip`: skip such steps (no weight or optimizer-state change)
            and stop after `max_skipped` of them.
        max_skipped: with `skip`, how many bad steps a run may skip before it stops.
        check_every_n_steps: with `stop`, how often the steps' flags are read on the host (0: every
            `trainer.log_every_n_steps`, when the loss is read anyway). The flags themselves stay on the device, so no
            step waits for the accelerator; checkpoints and exports always check first. `skip` must decide before
            each update, so it reads the step's flag every step (as torch's GradScaler does).
    """

    def __init__(self, policy: str = "stop", max_skipped: int = 10, check_every_n_steps: int = 0):
        if policy not in ("stop", "skip"):
            raise ValueError(f"callbacks.nonfinite.policy={policy!r}: use stop or skip")
        self.policy, self.max_skipped, self.check_every_n_steps = policy, max_skipped, check_every_n_steps
        self.skipped = 0
        self._unchecked: list[tuple[int, torch.Tensor]] = []  # (step, its gradients' largest |value|, on the device)
        self._recent: deque[tuple[int, list]] = deque(maxlen=64)  # (step, sample keys) of recent steps
        self._params: list[list[torch.Tensor]] = []  # what the optimizers update, by device (`on_train_start`)

    # -- the check, on the device --------------------------------------------------------------------
    def on_train_start(self, trainer, module) -> None:
        # The optimizers' parameters, listed once: walking the whole module tree (frozen VAE and text encoder
        # included) for them every step costs more than the check itself.
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    by_device.setdefault(param.device, []).append(param)
        self._params = list(by_device.values())

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        largest = self._largest_gradient()
        if largest is None:
            return
        if self.policy == "skip":
            if not bool(largest.isfinite()):  # one host read per step: the price of deciding before the update
                self._skip(trainer, optimizer)
            return
        self._unchecked.append((trainer.global_step, largest))  # read at the next check, with the steps before it

    def _largest_gradient(self) -> torch.Tensor | None:
        """The largest |gradient| of the step, on the device: finite exactly when every gradient is (max propagates
        NaN). One fused reduction per device (torch's own gradient clipping uses it) instead of ops per tensor."""
        largest = None
        for params in self._params:
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                value = torch.stack(torch._foreach_norm(grads, float("inf"))).amax()
                if hasattr(value, "full_tensor"):  # FSDP2: a DTensor over the ranks' shards; every rank gets the max
                    value = value.full_tensor()
                largest = value if largest is None else torch.maximum(largest, value.to(largest.device))
        return largest

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._recent.append((trainer.global_step, list(batch.get("key", []))[:8]))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        every = self.check_every_n_steps or trainer.log_every_n_steps or 1
        if self.policy == "stop" and trainer.global_step % every == 0:
            self.check(trainer)

    # -- reading it: before anything is written, and at the end ---------------------------------------
    def check(self, trainer: L.Trainer) -> None:
        """Read the flags of the steps since the last check (one wait for the device) and stop at the first bad one."""
        if not self._unchecked:
            return
        steps = [step for step, _ in self._unchecked]
        finite = torch.stack([value.to(self._unchecked[0][1].device) for _, value in self._unchecked]).isfinite()
        self._unchecked = []
        for step, ok in zip(steps, finite.tolist()):
            if not ok:
                raise TrainingFailed(self._message(trainer, step))

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.check(trainer)  # no checkpoint of NaN weights

    def on_train_end(self, trainer, module) -> None:
        self.check(trainer)  # runs before the export callback (conf/callbacks/default.yaml lists it first)

    def _skip(self, trainer: L.Trainer, optimizer) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                param.grad = None  # torch optimizers leave a parameter without a gradient untouched
        self.skipped += 1
        keys = self._keys_at(trainer.global_step)
        rank_zero_warn(f"step {trainer.global_step}: non-finite gradients (samples {keys}); skipped "
                       f"({self.skipped} of at most {self.max_skipped}).")
        if self.skipped > self.max_skipped:
            raise TrainingFailed(self._message(trainer, trainer.global_step, skipped=True))

    def _keys_at(self, step: int) -> list:
        return next((keys for s, keys in reversed(self._recent) if s == step), [])

    def _message(self, trainer: L.Trainer, step: int, skipped: bool = False) -> str:
        checkpoint = getattr(trainer.checkpoint_callback, "last_model_path", "") or "none yet"
        what = (f"more than {self.max_skipped} steps had non-finite gradients (the last at step {step})" if skipped
                else f"the loss or gradients became non-finite (NaN/inf) at step {step}")
        return (f"{what}, samples {self._keys_at(step)}. Nothing was exported from these weights. The last good "
                f"checkpoint: {checkpoint}. Lower optimizer.lr, check those samples, or set "
                f"callbacks.nonfinite.policy=skip to drop such steps.")
