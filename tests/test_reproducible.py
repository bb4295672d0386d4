"""The same command and seed give the same weights on a fresh machine and on a warm one.

On a fresh machine the first run builds the tiny model and writes the demo data into the cache, both after
`seed_everything`; nothing that build does may shift the run's random draws (LoRA init, noise, timesteps).
"""

from __future__ import annotations

import json

from conftest import compose
from safetensors import safe_open

from finetune.run import train


def demo_export(run_dir) -> tuple[dict, dict]:
    """The exported tensors (as bytes: bitwise) and the header metadata. The file's own bytes are not compared:
    safetensors writes the metadata entries in an arbitrary order."""
    train(compose(["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}", "trainer.max_steps=3",
                   "callbacks.samples=null", "callbacks.checkpoint=null", "data.demo_count=4"]))
    with safe_open(str(run_dir / "export" / "pytorch_lora_weights.safetensors"), "pt") as f:
        tensors = {key: f.get_tensor(key).numpy().tobytes() for key in f.keys()}
        metadata = {key: json.loads(value) if key == "lora_adapter_metadata" else value
                    for key, value in f.metadata().items()}
    return tensors, metadata


def test_fresh_and_warm_cache_export_identical_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("COGFT_CACHE", str(tmp_path / "fresh-cache"))
    fresh = demo_export(tmp_path / "fresh")  # builds the tiny model and the demo videos first
    assert (tmp_path / "fresh-cache" / "tiny" / "cogvideox" / "model_index.json").is_file()
    warm = demo_export(tmp_path / "warm")  # finds both in the cache
    assert fresh == warm
