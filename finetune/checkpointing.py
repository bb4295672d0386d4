"""Checkpoints: written atomically and loaded safely, tagged with what they were trained for, and saved when
training crashes or is interrupted (without Lightning's implicit resume)."""

from __future__ import annotations

import importlib.metadata
import os
import pickle
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from finetune.atomic import atomic_path
from finetune.errors import UserError
from finetune.guards import TrainingFailed


class RunInterrupted(Exception):
    """A run stopped by a signal (Ctrl-C, SIGTERM) at a step boundary, after writing `checkpoint` (None: stopped at
    once by a second signal, no checkpoint written)."""

    def __init__(self, signame: str, step: int, checkpoint: str | None):
        self.signame, self.step, self.checkpoint = signame, step, checkpoint
        where = f"{checkpoint} written at step {step}" if checkpoint else f"no checkpoint written (step {step})"
        super().__init__(f"{signame}: the run stopped; {where}")

    @property
    def exit_code(self) -> int:  # the shell's convention for a process ended by a signal
        return 128 + int(getattr(signal, self.signame, signal.SIGINT))


# The signals that stop a run at the end of the step it is in (SIGTERM: what SLURM and Kubernetes send before they
# stop or preempt a job).
STOP_SIGNALS = ("SIGINT", "SIGTERM")
_requested: list[str] = []  # the signal received, while a run is stopping (`interrupt_requested`)


def interrupt_requested() -> str | None:
    """The signal a run received and is stopping for (None: none): long optional work (validation samples) skips."""
    return _requested[0] if _requested else None


class CheckpointOnException(Checkpoint):
    """Exact resume after an interruption, and a checkpoint after a crash (docs/run-safety.md#interruptions).

    - **SIGINT (Ctrl-C) or SIGTERM** during training: the step in progress finishes (forward, backward, optimizer and
      scheduler, and any checkpoint or validation under way), then `dirpath/<filename>.ckpt` is written at that step
      boundary -- the same point `ModelCheckpoint` saves `last.ckpt` at -- and the run stops with `RunInterrupted`.
      Resumed with `ckpt_path=on_exception`, it continues exactly as the uninterrupted run (same noise draws, same
      batches, same weights). A second signal stops at once and writes nothing: the state in the middle of a step
      is not one a run can continue from exactly. With several processes the ranks agree (any rank's signal stops
      all of them) at the same step.
    - **A crash** (an exception inside a step): the checkpoint is written where the crash happened, so no progress is
      lost; it holds the weights of the last finished step, and the step that failed is redone with fresh noise
      draws (not bitwise the uninterrupted run).

    The checkpoint is removed by a run that then finishes (it would be older than `last.ckpt`). Lightning's own
    `OnExceptionCheckpoint` is not used: its presence makes `fit(ckpt_path=None)` mean `ckpt_path="last"`
    (lightning/pytorch/trainer/connectors/checkpoint_connector.py `_parse_ckpt_path`), so a run started in an existing
    run_dir would silently continue from its last checkpoint. Here only an explicit `ckpt_path` resumes.

    Args:
        dirpath: the directory of the checkpoint (the run's `checkpoints/`).
        filename: its name, without `.ckpt`.
    """

    def __init__(self, dirpath: str, filename: str = "on_exception"):
        if not filename:
            raise ValueError("callbacks.on_exception.filename is empty: give the checkpoint a name")
        self.dirpath, self.filename = dirpath, filename
        self._previous: dict[int, object] = {}
        self._signal_step: int | None = None

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.dirpath, self.filename + ".ckpt")

    # -- signals: requested in the handler, acted on at the next step boundary -------------------------------------
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # After Lightning registered its own SIGTERM handler (which would stop at its own point and, with its
        # subprocess launcher, kill the other ranks): this one replaces it for the run and is undone in teardown.
        _requested.clear()
        if threading.current_thread() is not threading.main_thread():
            return
        for name in STOP_SIGNALS:
            signum = getattr(signal, name)
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if _requested:  # the second one: stop now, with no checkpoint of a half-done step
            self._restore_handlers()
            raise KeyboardInterrupt
        _requested.append(name)
        sys.stderr.write(f"\n{name} received: finishing the current step, then saving {self.ckpt_path} to resume "
                         f"from ({name} or Ctrl-C again stops at once, without it).\n")
        sys.stderr.flush()

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous = {}

    def _stop_agreed(self, trainer: L.Trainer) -> bool:
        wanted = bool(_requested)
        if trainer.world_size > 1:  # one rank's signal stops every rank, at the same step
            wanted = bool(trainer.strategy.reduce_boolean_decision(wanted, all=False))
        return wanted

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # inside an accumulation window: the accumulated gradients are no checkpointed state
        if trainer.global_step >= (trainer.max_steps if trainer.max_steps > 0 else float("inf")):
            return  # the last step: the run finishes (and exports) instead
        if not self._stop_agreed(trainer):
            return
        signame = interrupt_requested() or "SIGTERM"  # a rank told by another rank
        trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        raise RunInterrupted(signame, trainer.global_step, self.ckpt_path)

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # a validation loop inside training (val_check_interval) runs after its step's end: stop right after it
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.on_train_batch_end(trainer, module, None, None, -1)

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, (RunInterrupted, KeyboardInterrupt)):
            return  # written at the step boundary already, or (a second signal) deliberately nothing
        # A failed `mode=test` has no training state worth keeping; a run stopped for non-finite weights must not
        # leave them in a checkpoint.
        if trainer.state.fn == TrainerFn.FITTING and not isinstance(exception, TrainingFailed):
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()
        _requested.clear()
        if stage == "fit":  # teardown runs only after a run that ended normally
            trainer.strategy.remove_checkpoint(self.ckpt_path)


class SafeCheckpointIO(TorchCheckpointIO):
    """Checkpoints written atomically and read without running code.

    Save: into a temporary file in the checkpoint's own folder, flushed to disk, then renamed over the
    destination, so a full disk, a size limit or a kill leaves the previous good file (never a 0-byte or
    truncated one), and the error names the destination and the cause.
    Load: `torch.load(weights_only=True)`: tensors and plain Python values only, so a checkpoint from someone
    else cannot execute code; a truncated or foreign file is named.
    """

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda f: torch.save(checkpoint, f), what="checkpoint")

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        path = Path(path)
        try:
            with path.open("rb") as f:
                return torch.load(f, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path}: not loaded, it holds objects other than weights and plain values "
                                  f"({str(err).splitlines()[0]}); the kit loads checkpoints with "
                                  f"weights_only=True so that a file cannot run code.") from None
        except (EOFError, RuntimeError, OSError, ValueError) as err:
            raise CheckpointError(f"{path}: cannot be read as a checkpoint ({type(err).__name__}: "
                                  f"{str(err).splitlines()[0] if str(err) else 'empty or truncated'}). It is "
                                  f"incomplete or not a checkpoint; pass another ckpt_path (e.g. "
                                  f"checkpoints/last.ckpt).") from None


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: unreadable, or written for something else."""


def write_atomically(path: Path, write, what: str = "file") -> None:
    """`write(binary file)` into `path` via a temporary file in the same folder (`finetune.atomic.atomic_path`),
    fsynced and renamed."""
    try:
        with atomic_path(path) as tmp, tmp.open("wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        kept = "the previous one is kept" if path.exists() else "nothing was written"
        raise OSError(err.errno, f"could not write the {what} {path} ({err.strerror or err}); {kept}. Free disk "
                                 f"space or fix the folder's permissions, then resume.") from None


def kit_version() -> str:
    try:
        return importlib.metadata.version("cog-finetune")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def run_identity(cfg) -> dict:
    """What a checkpoint was trained for: the recipe, the model (family and checkpoint), the adapter's settings,
    the kit's version. Stored in every checkpoint; a resume or `mode=test` with another one stops."""
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True)
    return {"recipe": str(cfg.name), "model": {"family": model.get("_target_"), "path": str(model.get("path"))},
            "adapter": OmegaConf.to_container(cfg.adapter, resolve=True), "kit_version": kit_version()}


def identity_differences(saved: dict, current: dict) -> list[str]:
    """`key: checkpoint X, this run Y` for everything but the kit's version."""
    differences = []
    for key in ("recipe", "model", "adapter"):
        if key in saved and saved[key] != current.get(key):
            differences.append(f"{key}: checkpoint {saved[key]}, this run {current.get(key)}")
    return differences
