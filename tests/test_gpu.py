"""GPU-only checks (skipped without CUDA): bf16 training; FSDP1, FSDP2 and DeepSpeed ZeRO-2/3 LoRA save, resume and
export on the tiny CogVideoX; the memory savers only a GPU shows (torchao CPU offload, 8-bit AdamW, the weight
memory of FP8 storage and block swap, QLoRA on an NF4 base)."""

from __future__ import annotations

import importlib.util

import lightning as L
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


# -- every strategy: LoRA-only checkpoints, resume and export (issue 11) --------------------------------------------
STRATEGIES = ["fsdp", "fsdp2",
              pytest.param("deepspeed_zero2", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                                       reason="deepspeed not installed")),
              pytest.param("deepspeed_zero2_offload", marks=pytest.mark.skipif(
                  importlib.util.find_spec("deepspeed") is None, reason="deepspeed not installed")),
              pytest.param("deepspeed_zero3", marks=pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                                                       reason="deepspeed not installed"))]


def exported(run_dir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(run_dir / "export" / "pytorch_lora_weights.safetensors")


@pytest.fixture(scope="module")
def single_device_adapter(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("single")
    train(gpu_cfg(run_dir, "trainer.precision=bf16-mixed", "callbacks.samples.at_end=false"))
    return exported(run_dir)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_saves_resumes_and_exports_the_same_lora(strategy, tmp_path, single_device_adapter):
    """3 steps, a LoRA-only checkpoint, resumed to 6: the exported adapter is complete (no empty or sharded tensor)
    and equals the single-device run's (bf16-mixed: within 1e-2 relative)."""
    common = [f"strategy={strategy}", "trainer.precision=bf16-mixed", "callbacks.checkpoint.every_n_train_steps=3"]
    train(gpu_cfg(tmp_path, *common, "trainer.max_steps=3", "callbacks.samples.at_end=false"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert last.exists()
    if last.is_file():  # DeepSpeed writes a folder; the others one file of trainable tensors
        state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
        assert state and all("lora_" in k for k in state)
    train(gpu_cfg(tmp_path, *common, "ckpt_path=last"))
    ours, reference = exported(tmp_path), single_device_adapter
    assert ours.keys() == reference.keys()
    for key, value in ours.items():
        assert value.numel() > 0 and value.shape == reference[key].shape, key
        torch.testing.assert_close(value.float(), reference[key].float(), rtol=1e-2, atol=1e-3, msg=key)
    assert list((tmp_path / "samples").glob("step_*/00.mp4"))  # validation ran under the strategy too


# -- memory savers that only a GPU shows (issue 11) ------------------------------------------------------------------
def test_cpu_offload_optimizer_trains(tmp_path):
    pytest.importorskip("torchao")
    train(gpu_cfg(tmp_path, "optimizer=adamw_cpu_offload", "callbacks.samples.at_end=false"))
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").stat().st_size > 0


def test_adamw_8bit_trains_on_the_gpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    train(gpu_cfg(tmp_path, "optimizer=adamw8bit", "callbacks.samples.at_end=false"))
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").stat().st_size > 0


class WeightProbe(L.Callback):
    """Bytes of transformer weights on the GPU as a training batch starts (block swap installed, nothing resident)."""

    seen: list[int] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        WeightProbe.seen.append(sum(p.numel() * p.element_size() for p in module.family.transformer.parameters()
                                    if p.device.type == "cuda"))


def test_block_swap_and_fp8_lower_the_weights_on_the_gpu(tmp_path):
    """The tiny model's transformer weights on the GPU during training: FP8 storage and block swap of both blocks
    each hold less than the bf16 base."""
    def transformer_bytes(name, *extra):
        WeightProbe.seen = []
        train(gpu_cfg(tmp_path / name, "model.dtype=bf16", "module.enable_gradient_checkpointing=true",
                      "callbacks.samples.at_end=false", "trainer.max_steps=2",
                      "+callbacks.probe._target_=test_gpu.WeightProbe", *extra))
        return max(WeightProbe.seen)

    plain = transformer_bytes("plain")
    assert transformer_bytes("fp8", "module.fp8_base=true") < 0.75 * plain
    assert transformer_bytes("swap", "module.blocks_to_swap=2") < 0.75 * plain


def test_qlora_nf4_base_trains_and_its_export_loads_in_diffusers(tmp_path):
    """The tiny CogView4 LoRA on an NF4 base (model.quantize_base=nf4): the transformer's linear layers are
    bitsandbytes 4-bit ones, the LoRA (fp32) trains, and the exported file loads into a plain, unquantized
    CogView4Pipeline through load_lora_weights, with every tensor and a changed output."""
    bnb = pytest.importorskip("bitsandbytes")
    from diffusers import CogView4Pipeline
    from safetensors.torch import load_file

    module = train(compose(["recipe=cogview4_lora", "preset=tiny", "logger=csv", f"run_dir={tmp_path}",
                            "trainer.accelerator=gpu", "trainer.devices=1", "trainer.max_steps=6",
                            "trainer.precision=bf16-mixed", "model.dtype=bf16", "model.quantize_base=nf4",
                            "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false"]))
    transformer = module.family.transformer
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in transformer.modules())
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    exported = load_file(tmp_path / "export" / "pytorch_lora_weights.safetensors")
    assert exported and any(v.abs().max() > 0 for k, v in exported.items() if "lora_B" in k)  # it trained

    pipe = CogView4Pipeline.from_pretrained(module.family.checkpoint_dir, dtype=torch.float32).to("cuda")
    inputs = dict(hidden_states=torch.randn(1, 16, 8, 8, device="cuda"),
                  encoder_hidden_states=torch.randn(1, 16, pipe.text_encoder.config.hidden_size, device="cuda"),
                  timestep=torch.tensor([500], device="cuda"), crop_coords=torch.zeros(1, 2, device="cuda"),
                  original_size=torch.tensor([[64.0, 64.0]], device="cuda"),
                  target_size=torch.tensor([[64.0, 64.0]], device="cuda"), return_dict=False)
    with torch.no_grad():
        before = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(tmp_path / "export", adapter_name="qlora")
        after = pipe.transformer(**inputs)[0]
    loaded = {n for n, _ in pipe.transformer.named_parameters() if "lora_" in n}
    assert len(loaded) == len(exported)
    assert not torch.allclose(before, after)


def test_qlora_nf4_cogvideox_trains_and_exports(tmp_path):
    """The tiny CogVideoX LoRA on an NF4 base: 4-bit linear layers, fp32 LoRA, a trained adapter exported."""
    bnb = pytest.importorskip("bitsandbytes")
    from safetensors.torch import load_file

    module = train(gpu_cfg(tmp_path, "model.dtype=bf16", "model.quantize_base=nf4", "trainer.precision=bf16-mixed",
                           "callbacks.samples.at_end=false"))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in module.family.transformer.modules())
    assert {p.dtype for p in module.parameters() if p.requires_grad} == {torch.float32}
    exported = load_file(tmp_path / "export" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in exported.items() if "lora_B" in k)
