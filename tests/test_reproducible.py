"""The same command and seed give the same weights on a fresh machine and on a warm one.

On a fresh machine the first run builds the tiny model and writes the demo data into the cache, both after
`seed_everything`; nothing that build does may shift the run's random draws (LoRA init, noise, timesteps).
"""

from __future__ import annotations

from conftest import compose

from finetune.run import train


def demo_export(run_dir) -> bytes:
    train(compose(["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}", "trainer.max_steps=3",
                   "callbacks.samples=null", "callbacks.checkpoint=null", "data.demo_count=4"]))
    return (run_dir / "export" / "pytorch_lora_weights.safetensors").read_bytes()


def test_fresh_and_warm_cache_export_identical_adapters(tmp_path, monkeypatch):
    monkeypatch.setenv("COGFT_CACHE", str(tmp_path / "fresh-cache"))
    fresh = demo_export(tmp_path / "fresh")  # builds the tiny model and the demo videos first
    assert (tmp_path / "fresh-cache" / "tiny" / "cogvideox" / "model_index.json").is_file()
    warm = demo_export(tmp_path / "warm")  # finds both in the cache
    assert fresh == warm
