"""Each memory saver on the tiny CogVideoX LoRA: one step's gradients (or update) within a stated tolerance of the
plain step. What only a GPU can show (the memory each saves, torchao's CPU offload) is in tests/test_gpu.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import compose
from test_cogvideox_objective import fixed_batch, tiny_family

from finetune.adapters import LoRA
from finetune.memory import BlockSwap, adamw_cpu_offload, swap_blocks
from finetune.module import FinetuneModule


def lora_module(**settings) -> FinetuneModule:
    torch.manual_seed(0)
    module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8, init_lora_weights="gaussian"),
                            optimizer=lambda p: torch.optim.AdamW(p), **settings)
    module.train()
    return module


def step_gradients(module: FinetuneModule) -> torch.Tensor:
    """One step's LoRA gradients on a fixed batch, noise and timesteps."""
    g = torch.Generator().manual_seed(5)
    encoded = module.family.encode(fixed_batch())
    x0_shape = encoded["latent_mean"].permute(0, 2, 1, 3, 4).shape
    noise, timesteps = torch.randn(x0_shape, generator=g), torch.tensor([100, 700])
    encoded["latent_logvar"] = torch.full_like(encoded["latent_logvar"], -30.0)  # the posterior's mean: no draw
    module.zero_grad()
    module.family.training_loss(encoded, noise=noise, timesteps=timesteps).backward()
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad])


@pytest.fixture(scope="module")
def plain(tiny_cogvideox) -> torch.Tensor:
    return step_gradients(lora_module())


def test_block_swap_gives_the_same_gradients(plain):
    """Exact: the swap only moves the frozen weights (here between two CPU tensors) around each block's forward."""
    module = lora_module(blocks_to_swap=2, enable_gradient_checkpointing=True)
    blocks = module.family.transformer_blocks()
    swap = swap_blocks(module.family, 2, torch.device("cpu"))
    assert len(blocks) == 2 and set(swap.blocks) == set(blocks)
    frozen = [p for p in blocks[-1].parameters() if not p.requires_grad]
    seen = []
    probe = blocks[-1].register_forward_pre_hook(lambda *_: seen.append(frozen[0].data_ptr()), prepend=False)
    swapped = step_gradients(module)
    probe.remove()
    torch.testing.assert_close(swapped, plain, rtol=0, atol=0)
    # the block ran on a fresh copy (forward and the recomputation in backward), and is back on its host copy
    assert len(seen) == 2 and all(ptr != swap.host[frozen[0]].data_ptr() for ptr in seen)
    on_device = [b for b in blocks if any(p.data_ptr() != swap.host[p].data_ptr() for p in swap._frozen(b))]
    assert len(on_device) <= 1  # at most one swapped block's copy is alive after the step, none after `release`
    swap.release()
    assert swap.resident is None and frozen[0].data_ptr() == swap.host[frozen[0]].data_ptr()
    swap.remove()
    with pytest.raises(ValueError, match="blocks_to_swap=3.*2 transformer blocks"):
        swap_blocks(module.family, 3, torch.device("cpu"))


def test_fp8_base_gradients_within_tolerance(plain):
    """The base's layer weights stored in float8 e4m3 (3 mantissa bits, ~6% relative rounding per weight): the LoRA
    gradients stay within 15% (relative L2) of the fp32 step and point the same way (cosine > 0.99); LoRA stays fp32."""
    module = lora_module(fp8_base=True)
    block = module.family.transformer_blocks()[0]
    assert block.attn1.to_q.base_layer.weight.dtype == torch.float8_e4m3fn
    assert block.attn1.to_q.lora_A["default"].weight.dtype == torch.float32
    grads = step_gradients(module)
    assert grads.isfinite().all()
    relative = (grads - plain).norm() / plain.norm()
    cosine = torch.nn.functional.cosine_similarity(grads, plain, dim=0)
    assert 0 < relative < 0.15 and cosine > 0.99, (float(relative), float(cosine))


def test_fp8_base_refuses_a_full_finetune(tiny_cogvideox):
    from finetune.adapters import Full

    family = tiny_family()
    family.transformer.requires_grad_(True)
    with pytest.raises(ValueError, match="cannot train those weights"):
        FinetuneModule(family, Full(), optimizer=lambda p: torch.optim.AdamW(p), fp8_base=True)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="the memory extra is not installed")
def test_adamw_8bit_update_within_tolerance():
    """bitsandbytes AdamW8bit (8-bit moments, forced on a 64x64 tensor) moves the weights like torch's AdamW: the
    first three updates agree within 2% relative L2."""
    from finetune.memory import adamw_8bit

    g = torch.Generator().manual_seed(0)
    start = torch.randn(64, 64, generator=g)
    grads = [torch.randn(64, 64, generator=g) for _ in range(3)]
    moved = []
    for make in (lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.0),
                 lambda p: adamw_8bit(p, lr=1e-2, weight_decay=0.0, min_8bit_size=1)):
        param = torch.nn.Parameter(start.clone())
        optimizer = make([param])
        for grad in grads:
            param.grad = grad.clone()
            optimizer.step()
        moved.append(param.detach() - start)
    state = optimizer.state[param]
    assert state["state1"].dtype == torch.uint8  # the moments really are 8-bit
    relative = (moved[1] - moved[0]).norm() / moved[0].norm()
    assert relative < 0.02, float(relative)


def test_cpu_offload_optimizer_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("tested on the GPU (tests/test_gpu.py)")
    with pytest.raises(RuntimeError, match="without a CUDA GPU use optimizer=adamw"):
        adamw_cpu_offload([torch.nn.Parameter(torch.zeros(2))])


def test_block_swap_hooks_leave_nothing_behind():
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4))
    layer.requires_grad_(False)
    swap = BlockSwap([layer[0]], torch.device("cpu"))
    x = torch.randn(2, 4)
    out = layer(x)
    swap.remove()
    assert not layer[0]._forward_pre_hooks and not layer[0]._forward_hooks
    torch.testing.assert_close(layer(x), out)


def test_savers_through_the_config_train_export_and_sample(tmp_path):
    """The user's path: `module.fp8_base=true module.blocks_to_swap=1` with checkpointing trains, exports a loadable
    LoRA and makes the validation sample."""
    from conftest import compose
    from safetensors.torch import load_file

    from finetune.run import train

    module = train(compose(["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={tmp_path}",
                            "trainer.max_steps=3", "data.demo_count=2", "callbacks.samples.every_n_steps=0",
                            "module.fp8_base=true", "module.blocks_to_swap=1",
                            "module.enable_gradient_checkpointing=true"]))
    assert module.block_swap is None  # removed at the end of the run
    lora = load_file(tmp_path / "export" / "pytorch_lora_weights.safetensors")
    assert lora and all(v.dtype == torch.float32 and v.numel() > 0 for v in lora.values())
    assert (tmp_path / "samples" / "step_000003" / "00.mp4").exists()


# -- QLoRA (model.quantize_base=nf4): what a CPU can check; the training run is in tests/test_gpu.py ------------------
@pytest.mark.parametrize("recipe", ["cogview4_lora", "cogvideox_lora", "cogvideox15_i2v_lora"])
def test_quantize_base_is_checked_before_any_weight_loads(monkeypatch, recipe):
    """A bad value, a machine without CUDA, and a missing bitsandbytes each stop the family before it resolves its
    checkpoint (a path that does not exist would fail there otherwise), naming the setting and the fix."""
    import functools

    from hydra.utils import get_class
    from omegaconf import OmegaConf

    from recipes.diffusion.pipeline import base_quantization

    settings = OmegaConf.to_container(compose([f"recipe={recipe}"]).model, resolve=True)
    family = get_class(settings.pop("_target_"))
    cls = functools.partial(family, **{k: v for k, v in settings.items() if k not in ("path", "quantize_base")})
    assert base_quantization(None, torch.bfloat16) is None
    with pytest.raises(ValueError, match=r"model.quantize_base='int3': use nf4 .* or null"):
        cls(path="/nowhere/checkpoint", quantize_base="int3")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs a CUDA GPU.*set model.quantize_base=null"):
            cls(path="/nowhere/checkpoint", quantize_base="nf4")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(__import__("sys").modules, "bitsandbytes", None)  # import fails as when not installed
    with pytest.raises(ImportError, match=r"needs bitsandbytes.*pip install -e '\.\[memory\]'"):
        cls(path="/nowhere/checkpoint", quantize_base="nf4")
    with pytest.raises(FileNotFoundError, match="/nowhere/checkpoint"):  # without it: the path is what fails
        cls(path="/nowhere/checkpoint")


def test_fp8_storage_refuses_a_quantized_base():
    from finetune.memory import fp8_weight_storage

    class QuantizedNetwork(torch.nn.Linear):  # what diffusers marks a bitsandbytes-loaded model with
        is_quantized = True

        def enable_layerwise_casting(self, **_):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="quantize_base=nf4.*set one of the two"):
        fp8_weight_storage(QuantizedNetwork(4, 4).requires_grad_(False), torch.bfloat16)
