"""Resolving `model.path`: a local directory, a hub id, or `tiny` (the family's tiny random model)."""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from finetune.atomic import atomic_path


def cache_root() -> Path:
    return Path(os.environ.get("COGFT_CACHE", Path.home() / ".cache" / "cog-finetune"))


def resolve_pretrained(path: str, *, family: str, build_tiny: Callable[[Path], None],
                       marker: str = "model_index.json") -> str:
    """Return a local directory holding the checkpoint, or stop at once with a message that says how
    to point at a local copy or run the tiny demo."""
    if path == "tiny":
        target = cache_root() / "tiny" / family
        if not (target / marker).exists():
            build_atomically(target, build_tiny)
        return str(target)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / marker).exists():
            raise FileNotFoundError(
                f"model.path={path!r} exists but has no {marker}: it is not a {family} checkpoint in "
                f"the diffusers/transformers layout. Point model.path at the folder that holds {marker}.")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise FileNotFoundError(f"model.path={path!r}: no such directory. {_how_to(family, '<repo>')}")
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=None)
    except Exception as err:  # offline, unknown repo, gated repo, no disk: all say the same thing
        raise FileNotFoundError(
            f"model.path={path!r}: the weights could not be reached ({type(err).__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''}). {_how_to(family, path)}") from None


@contextlib.contextmanager
def global_rng_untouched():
    """Restore torch's, NumPy's and Python's global random state afterwards: what a cache builds (tiny models,
    demo data) must not shift the run's draws, or a fresh machine would train other weights than a warm one."""
    python_state, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


def build_atomically(target: Path, build: Callable[[Path], None]) -> None:
    """Build into a private folder and rename it into place (`finetune.atomic.atomic_path`): a crash never leaves a
    half-written model, and ranks that build at the same time (torchrun) never see each other's partial files; the
    first to finish wins and the others' copies are removed. The global random state is left as it was."""
    with atomic_path(target, replace=_unless_built) as partial, global_rng_untouched():
        build(partial)


def _unless_built(partial: Path, target: Path) -> None:
    try:
        partial.rename(target)
    except OSError:  # another process finished first: keep its copy (atomic_path removes this one)
        if not target.exists():
            raise


def _how_to(family: str, repo: str) -> str:
    return (f"Download the checkpoint on a machine with network access (`hf download "
            f"{repo} --local-dir DIR`) and pass model.path=DIR, or run the offline demo with "
            f"preset=tiny (a tiny random {family} built locally).")
