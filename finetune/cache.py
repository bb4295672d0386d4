"""Encode once: what the frozen encoders make of every training sample, on disk, read by training instead.

- `EncodedCache`: one safetensors file per sample, `<directory>/<digest(namespace)>/<digest(key)>.safetensors`. The
  namespace is everything the encodings depend on besides the sample -- the family's `cache_namespace()` (model path
  and the encoders' files, dtype, sizes, text length, VAE tiling) and the kit's version (added by
  `finetune.module.FinetuneModule`); the key is the data module's sample key (the file by path, size and mtime or by
  its bytes' hash, the bucket, the caption's hash, the conditioning image, the preprocessing). A change to any of them
  gives another file name, so it re-encodes exactly the samples it affects and a stale entry is never read: no one
  deletes a cache folder by hand (entries no run uses any more stay on disk; remove the folder to reclaim the space).
- `precompute`: the pass before training that writes `family.encode` of every sample the cache lacks, a batch at a
  time (one bucket each), decoded by the data module's loader. Resumable: entries are written as they are encoded
  and present ones are skipped, so an interrupted pass continues where it stopped.

Why the VAE posterior's moments (mean, logvar) rather than one latent: training draws a fresh latent from the posterior
every step (`recipes.diffusion.objectives.sample_latents`), exactly as without the cache, so caching changes the speed and not
the objective; the price is twice a latent's size on disk (49x480x720 CogVideoX in bf16: 4.5 MB of moments plus 1.9 MB
of T5 embeddings per sample, `bench/encode_cache.py`).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


def files_fingerprint(directory: str | os.PathLike | None, parts: Iterable[str] = ()) -> str:
    """The files under `directory/part` (every part; the whole folder without parts) by name, size and mtime, as a
    short digest: a checkpoint's encoders are identified by their files, not only by the path (a rebuilt tiny model,
    another hub snapshot). `directory` None (components built in memory): "in-memory"."""
    if directory is None:
        return "in-memory"
    root = Path(directory)
    entries = []
    for base in [root / p for p in parts] or [root]:
        for path in sorted(base.rglob("*")) if base.is_dir() else [base] if base.exists() else []:
            if path.is_file():
                stat = path.stat()
                entries.append(f"{path.relative_to(root)}|{stat.st_size}|{stat.st_mtime_ns}")
    return _digest("\n".join(entries))


class EncodedCache:
    """Per-sample encodings in `directory`, under the namespace's own folder (see the module docstring).

    Small and picklable (a path and a string): its `read` is what a data module's transform calls in loader workers.
    """

    def __init__(self, directory: str | os.PathLike, namespace: str):
        self.root = Path(directory).expanduser()
        self.namespace = namespace
        self.directory = self.root / _digest(namespace)

    def path(self, key: str) -> Path:
        return self.directory / f"{_digest(key)}.safetensors"

    def has(self, key: str) -> bool:
        # Entries appear only whole (written under a private name, then renamed), so existing means complete.
        return self.path(key).is_file()

    def missing(self, keys: list[str]) -> list[int]:
        return [i for i, key in enumerate(keys) if not self.has(key)]

    def read(self, key: str) -> dict[str, torch.Tensor]:
        path = self.path(key)
        try:
            return load_file(str(path))
        except (OSError, RuntimeError, ValueError) as err:  # safetensors raises its own errors as these
            raise RuntimeError(
                f"{path}: the encodings of sample {key!r} cannot be read ({type(err).__name__}: {err}). The precompute "
                f"pass before training writes every missing entry: remove this damaged file and start the run again "
                f"(or train with module.cache=off).") from None

    def write(self, keys: list[str], encoded: dict[str, torch.Tensor]) -> None:
        """Sample i of the batch `encoded` (per-sample tensors, batch first) as the entry of `keys[i]`."""
        self.directory.mkdir(parents=True, exist_ok=True)
        label = self.directory / "namespace.txt"  # what this folder holds, for whoever looks at the disk
        if not label.exists():
            _write_atomically(label, lambda tmp: Path(tmp).write_text(self.namespace + "\n", encoding="utf-8"))
        for i, key in enumerate(keys):
            sample = {name: value[i].detach().to("cpu").contiguous() for name, value in encoded.items()}
            _write_atomically(self.path(key), lambda tmp: save_file(sample, tmp, metadata={"key": key}))


def _write_atomically(path: Path, write: Callable[[str], None]) -> None:
    """A private temporary name, then an atomic rename: a crash never leaves a truncated entry, and processes sharing
    the cache (DDP ranks, concurrent runs) never write into each other's files."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def precompute(cache: EncodedCache, datamodule, encode: Callable[[dict], dict], rank: int = 0, world_size: int = 1,
               barrier: Callable[[], None] | None = None, progress: bool = True) -> int:
    """Write `encode(batch)` for every training sample of `datamodule` (a `finetune.data.FamilyDataModule` after
    `setup`, decoding) that `cache` lacks; returns how many samples this process encoded.

    With several processes, rank r encodes the missing samples i with i % world_size == r; after `barrier` each
    encodes whatever is still missing (nothing, unless the nodes do not share `cache.directory`)."""
    keys = [key for key, _ in datamodule.sample_index()]
    missing = cache.missing(keys)
    mine = [i for i in missing if i % world_size == rank]
    if rank == 0:
        rank_zero_info(f"encoded cache: {cache.directory} ({len(keys) - len(missing)} of {len(keys)} samples present"
                       + ("; encoding the others once, before training)" if missing else ")"))
    done = _encode(cache, datamodule, encode, mine, progress)
    if world_size > 1:
        if barrier is not None:
            barrier()
        done += _encode(cache, datamodule, encode, cache.missing(keys), progress)
    return done


def _encode(cache: EncodedCache, datamodule, encode, indices: list[int], progress: bool) -> int:
    if not indices:
        return 0
    from tqdm.auto import tqdm

    done = 0
    with tqdm(total=len(indices), desc="encoding (VAE, text encoder) once", unit="sample",
              disable=not progress) as bar:
        for batch in datamodule.encoding_loader(indices):
            batch_keys = list(batch["key"])
            cache.write(batch_keys, encode(batch))
            done += len(batch_keys)
            bar.update(len(batch_keys))
    return done
