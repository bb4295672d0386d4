"""GPU-only checks (skipped without CUDA): bf16 training, FSDP and DeepSpeed on the tiny CogVideoX."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import compose

from finetune.run import train

pytestmark = pytest.mark.gpu


def gpu_cfg(run_dir, *extra):
    return compose(["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}",
                    "trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_steps=6",
                    "callbacks.samples.every_n_steps=0", "data.demo_count=4", *extra])


def test_bf16_mixed_keeps_lora_in_fp32(tmp_path):
    module = train(gpu_cfg(tmp_path, "model.dtype=bf16", "trainer.precision=bf16-mixed"))
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    assert module.family.transformer.proj_out.weight.dtype == torch.bfloat16
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").exists()
    assert list((tmp_path / "samples").glob("step_*/00.mp4"))


def test_fsdp_trains_and_exports(tmp_path):
    module = train(gpu_cfg(tmp_path, "strategy=fsdp", "trainer.precision=bf16-mixed"))
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["state_dict"] and all("lora_" in k for k in ckpt["state_dict"])
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert module.trainer.global_step == 6


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_zero2_trains_and_exports(tmp_path):
    train(gpu_cfg(tmp_path, "strategy=deepspeed_zero2", "trainer.precision=bf16-mixed"))
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").stat().st_size > 0
