"""Signals delivered to the training process at a chosen step and phase, as Ctrl-C (SIGINT) or a scheduler's
preemption (SIGTERM) would: `SignalAt` is a callback the interruption tests add through the config
(`+callbacks.signal._target_=interrupt_harness.SignalAt`), and `StepLosses` records every step's loss."""

from __future__ import annotations

import functools
import os
import signal

import lightning as L

# Where a signal can land, in the order of one optimizer step (and what happens around it).
PHASES = ("data", "batch_start", "forward", "backward", "optimizer", "scheduler", "batch_end", "validation",
          "checkpoint")
AFTER_STEP = {"scheduler", "batch_end", "validation", "checkpoint"}


class SignalAt(L.Callback):
    """Sends `signame` (`count` times) to this process when the step whose index is `step` (0-based: the optimizer
    step being computed, `trainer.global_step` while it runs) reaches `phase`. Each phase is entered through the
    hook or the function that runs there; the handler runs at the next bytecode, i.e. inside that phase."""

    def __init__(self, step: int, phase: str, signame: str = "SIGINT", count: int = 1, group: bool = False):
        assert phase in PHASES, phase
        self.step, self.phase, self.count, self.group = int(step), phase, int(count), bool(group)
        self.signum = getattr(signal, signame)
        self.sent = False
        self.trainer = None

    def _fire(self, phase: str) -> None:
        trainer = self.trainer
        if self.sent or phase != self.phase or trainer is None or trainer.state.fn != "fit" or trainer.sanity_checking:
            return
        if phase != "validation" and not trainer.training:  # e.g. the validation loss's forward
            return
        # once the optimizer has stepped, `global_step` counts the step being finished
        if trainer.global_step - (phase in AFTER_STEP) != self.step:
            return
        self.sent = True
        for _ in range(self.count):  # `group`: to every process of the group, as a terminal's Ctrl-C (loader workers)
            os.killpg(os.getpgid(0), self.signum) if self.group else os.kill(os.getpid(), self.signum)

    def _wrap(self, owner, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            self._fire(phase)
            return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    def on_fit_start(self, trainer, module):
        self.trainer = trainer
        self._wrap(module.family, "training_loss", "forward")
        self._wrap(module.family, "generate", "validation")  # validation samples
        self._wrap(module.family, "evaluate", "validation")  # the validation loop (CogVLM)
        self._wrap(trainer.strategy.checkpoint_io, "save_checkpoint", "checkpoint")

    def on_train_start(self, trainer, module):
        self._wrap(module, "lr_scheduler_step", "scheduler")  # (the scheduler's own attributes are its state)
        # the loader's fetcher reads each batch with `dataset.__getitems__` (an attribute lookup on the instance)
        self._wrap(trainer.train_dataloader.dataset, "__getitems__", "data")

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._fire("batch_start")

    def on_after_backward(self, trainer, module):
        self._fire("backward")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        self._fire("optimizer")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self._fire("batch_end")


# run_dir -> [(optimizer step, epoch, batch index), loss] of every run in it, in order (an interrupted run and its
# resumption append to the same list)
RECORDS: dict[str, list] = {}


class StepLosses(L.Callback):
    """Records every micro-batch's loss under its run_dir in `RECORDS`."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        key = (trainer.global_step, trainer.current_epoch, batch_idx)
        RECORDS.setdefault(str(trainer.default_root_dir), []).append((key, float(loss)))
