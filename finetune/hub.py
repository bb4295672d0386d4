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
from finetune.errors import ModelPathError


def cache_root() -> Path:
    return Path(os.environ.get("COGFT_CACHE", Path.home() / ".cache" / "cog-finetune"))


#: What the checks of a run read from a hub checkpoint before its weights download (`resolve_pretrained` with
#: `weights=False`): configs (`model_index.json`, each component's `config.json`, the scheduler's), tokenizers (caption
#: lengths, chat templates) and the weight index files (`*.safetensors.index.json`).
CHECK_FILES = ("*.json", "*.txt", "*.model", "*.tiktoken", "tokenizer*")
#: Never fetched with them: weights (whatever their name), and code (the kit never runs `trust_remote_code`).
NOT_CHECK_FILES = ("*.py", "*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.onnx", "*.msgpack",
                   "*.h5")

# A snapshot folder fetched without its weights -> (hub id, family): what `fetch_weights` completes.
_awaiting_weights: dict[str, tuple[str, str]] = {}


def resolve_pretrained(path: str, *, family: str, build_tiny: Callable[[Path], None],
                       marker: str = "model_index.json", weights: bool = True) -> str:
    """Return a local directory holding the checkpoint, or stop at once with a message that says how
    to point at a local copy or run the tiny demo. `weights=False`: a hub id fetches only `CHECK_FILES` into its
    snapshot folder, and `fetch_weights(folder)` downloads the rest into the same folder once the run's checks
    passed; a local folder and `tiny` are the same either way (nothing downloads)."""
    if path == "tiny":
        target = cache_root() / "tiny" / family
        if not (target / marker).exists():
            build_atomically(target, build_tiny)
        return str(target)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / marker).exists():
            raise ModelPathError(
                f"model.path={path!r} exists but has no {marker}: it is not a {family} checkpoint in "
                f"the diffusers/transformers layout. Point model.path at the folder that holds {marker}.")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") != 1:
        raise ModelPathError(f"model.path={path!r}: no such directory. {_how_to(family, '<repo>')}")
    if weights:
        folder = _download(path, family, "the weights")
        _awaiting_weights.pop(folder, None)
        return folder
    folder = _download(path, family, "its configs", allow_patterns=list(CHECK_FILES),
                       ignore_patterns=list(NOT_CHECK_FILES))
    _awaiting_weights[folder] = (path, family)
    return folder


def fetch_weights(folder: str | os.PathLike) -> None:
    """Download the rest (the weights) of a hub checkpoint that `resolve_pretrained(weights=False)` fetched the configs
    of, into the same snapshot folder (the commit it names), with huggingface_hub's progress bar. Nothing for any
    other folder (a local one, `tiny`, a hub checkpoint already whole). Offline (`HF_HUB_OFFLINE=1`), weights missing
    from the local cache stop the run with a `ModelPathError` and the fix."""
    repo = _awaiting_weights.pop(str(folder), None)
    if repo is None:
        return
    path, family = repo
    from lightning.pytorch.utilities import rank_zero_info

    rank_zero_info(f"model.path={path!r}: settings, data and LoRA targets checked; fetching the weights into {folder}")
    _download(path, family, "the weights", revision=Path(folder).name)


def _download(path: str, family: str, what: str, **patterns) -> str:
    import huggingface_hub

    try:
        return huggingface_hub.snapshot_download(path, **patterns)
    except Exception as err:  # offline, unknown repo, gated repo, no disk: all say the same thing
        raise ModelPathError(
            f"model.path={path!r}: {what} could not be reached ({type(err).__name__}: "
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


def check_weight_files(folder: str | os.PathLike, setting: str) -> None:
    """Every `.safetensors` file under a checkpoint folder is whole: its header parses and the tensors it lists end
    within the file. Read before any weight loads (8 bytes and the JSON header per file), so a truncated download
    stops the run with the file, its size and the fix, not with a loader's error halfway through loading."""
    import json

    for file in sorted(Path(folder).rglob("*.safetensors")):
        size = file.stat().st_size
        problem = None
        try:
            with open(file, "rb") as handle:
                head = handle.read(8)
                length = int.from_bytes(head, "little") if len(head) == 8 else None
                if length is None or 8 + length > size:
                    problem = f"{size} bytes, shorter than its own header"
                else:
                    header = json.loads(handle.read(length))
                    end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                              default=0)
                    if 8 + length + end > size:
                        problem = f"{size} bytes, while its header lists tensors up to byte {8 + length + end}"
        except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as err:
            problem = f"{size} bytes with an unreadable header ({type(err).__name__})"
        if problem:
            raise ModelPathError(f"{setting}: {file} is damaged ({problem}): an interrupted download or copy. "
                                 f"Download or copy that file again (e.g. `hf download REPO --local-dir DIR`), then "
                                 f"run again.")
