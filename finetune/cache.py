"""A disk cache of what the frozen encoders produce (VAE posterior, text embeddings), per sample.

Written once for every family: a family says what its encoding depends on (`cache_namespace`), the
data module gives each sample a `key` that changes when the file or caption changes, and the cache
stores one safetensors file per sample. Later epochs and later runs skip the VAE and text encoder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:24]


class EncodedCache:
    def __init__(self, directory: str | Path, namespace: str):
        self.directory = Path(directory) / _digest(namespace)
        self.directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.directory / f"{_digest(key)}.safetensors"

    def get_or_encode(self, batch: dict, encode) -> dict[str, torch.Tensor]:
        keys = list(batch["key"])
        paths = [self._path(k) for k in keys]
        if all(p.exists() for p in paths):
            device = _device_of(batch)
            items = [load_file(str(p)) for p in paths]
            return {name: torch.stack([item[name] for item in items]).to(device) for name in items[0]}
        encoded = encode(batch)
        for i, path in enumerate(paths):
            sample = {name: value[i].detach().to("cpu").contiguous() for name, value in encoded.items()}
            # A private temporary name, then an atomic rename: a crash never leaves a truncated entry, and runs
            # sharing the cache never write into each other's files.
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file(sample, str(tmp))
            tmp.replace(path)
        return encoded


def _device_of(batch: dict) -> torch.device:
    for value in batch.values():
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")
