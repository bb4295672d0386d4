"""Checkpoints: written atomically and loaded safely, tagged with what they were trained for, and saved when
training crashes or is interrupted (without Lightning's implicit resume)."""

from __future__ import annotations

import importlib.metadata
import os
import pickle
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.trainer.states import TrainerFn

from finetune.atomic import atomic_path
from finetune.errors import UserError
from finetune.guards import TrainingFailed


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
        # A failed `mode=test` has no training state worth keeping; a run stopped for non-finite weights must not
        # leave them in a checkpoint.
        if trainer.state.fn == TrainerFn.FITTING and not isinstance(exception, TrainingFailed):
            trainer.save_checkpoint(self.ckpt_path)

    def teardown(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
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
