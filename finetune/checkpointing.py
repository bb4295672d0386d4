"""Save a checkpoint when training crashes or is interrupted, without Lightning's implicit resume."""

from __future__ import annotations

import os

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn


class CheckpointOnException(Checkpoint):
    """On an exception (a crash, Ctrl-C) during `fit`, write `dirpath/<filename>.ckpt`; resume with
    `ckpt_path=<it>`. A run that then finishes removes it (it would be older than `last.ckpt`).

    Lightning's own `OnExceptionCheckpoint` does the same, but its presence makes `fit(ckpt_path=None)` mean
    `ckpt_path="last"` (lightning/pytorch/trainer/connectors/checkpoint_connector.py `_parse_ckpt_path`): a run
    started in an existing run_dir without `ckpt_path` would silently continue from its last checkpoint, and
    every fresh run warns twice about a missing one. Here only an explicit `ckpt_path` resumes.

    Args:
        dirpath: the directory of the checkpoint (the run's `checkpoints/`).
        filename: its name, without `.ckpt`.
    """

    def __init__(self, dirpath: str, filename: str = "on_exception"):
        if not filename:
            raise ValueError("callbacks.on_exception.filename is empty: give the checkpoint a name")
        self.dirpath, self.filename = dirpath, filename

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.dirpath, self.filename + ".ckpt")

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn == TrainerFn.FITTING:  # a failed `mode=test` has no training state worth keeping
            trainer.save_checkpoint(self.ckpt_path)

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if stage == "fit":  # teardown runs only after a run that ended normally
            trainer.strategy.remove_checkpoint(self.ckpt_path)
