"""CogView3-Plus: the tiny checkpoint, the v-prediction objective, conditioning as the pipeline's, golden
losses, and the merged-LoRA export loaded by CogView3PlusPipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cogvideox_objective import reference_alphas_cumprod

from finetune.adapters import LoRA, merged_state_dict
from finetune.module import FinetuneModule
from recipes.cogview.cogview3plus import CogView3Plus

PROMPTS = ["a red circle on a white background", "a blue square"]


@pytest.fixture(scope="session")
def tiny_cogview3plus(cache_dir) -> str:
    from finetune.hub import resolve_pretrained
    from recipes.cogview.cogview3plus_tiny import save_tiny_cogview3plus

    return resolve_pretrained("tiny", family="cogview3plus", build_tiny=save_tiny_cogview3plus)


def tiny_family() -> CogView3Plus:
    return CogView3Plus(path="tiny", dtype="fp32", height=64, width=64, max_sequence_length=16)


def fixed_batch(seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(2, 3, 32, 64, generator=g) * 2 - 1, "prompt": list(PROMPTS), "key": ["a", "b"]}


def test_tiny_checkpoint_has_the_hub_layout_and_scheduler(tiny_cogview3plus):
    index = json.loads((Path(tiny_cogview3plus) / "model_index.json").read_text())
    assert index["_class_name"] == "CogView3PlusPipeline" and index["scheduler"][1] == "CogVideoXDDIMScheduler"
    family = tiny_family()
    assert family.scheduler.config.prediction_type == "v_prediction" and family.scheduler.config.snr_shift_scale == 4.0
    torch.testing.assert_close(family.scheduler.alphas_cumprod, reference_alphas_cumprod(4.0))
    assert family.scheduler.alphas_cumprod[-1] == 0  # zero terminal SNR
    assert not hasattr(family.transformer, "add_adapter")  # why the export merges the LoRA


def test_loss_is_v_mse_with_the_pipelines_conditioning(tiny_cogview3plus):
    family = tiny_family()
    calls = []
    forward = family.transformer.forward

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return forward(*args, **kwargs)

    family.transformer.forward = spy
    family.pipe(PROMPTS[0], height=32, width=64, num_inference_steps=2, guidance_scale=1.0,
                max_sequence_length=16, generator=torch.Generator().manual_seed(0))
    inference = calls[-1]
    encoded = family.encode(fixed_batch())
    torch.manual_seed(0)
    x0 = family.sample_latents(encoded)
    noise, t = torch.randn_like(x0), torch.tensor([3, 999])
    torch.manual_seed(0)
    loss = family.training_loss(encoded, noise=noise, timesteps=t)
    training = calls[-1]
    for name in ("original_size", "target_size", "crop_coords"):  # (H, W) order and a zero crop, as inference
        torch.testing.assert_close(training[name][:1], inference[name][:1].to(training[name].dtype))
    assert inference["encoder_hidden_states"].shape[1] == training["encoder_hidden_states"].shape[1] == 16

    abar = reference_alphas_cumprod(4.0)[t].float().view(2, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    torch.testing.assert_close(training["hidden_states"], x_t, rtol=1e-5, atol=1e-5)
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    v_hat = forward(**{**training, "return_dict": False})[0]
    torch.testing.assert_close(loss, ((v_hat - v) ** 2).mean(), rtol=1e-5, atol=1e-6)


def test_merged_lora_export_is_loaded_by_the_pipeline_and_reproduces_training(tiny_cogview3plus, tmp_path):
    from diffusers import CogView3PlusPipeline, CogView3PlusTransformer2DModel

    module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p))
    family = module.family
    torch.manual_seed(0)
    for name, param in family.transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.2)
    layer = family.transformer.transformer_blocks[0].attn1.to_q  # W + (alpha / r) B A
    expected = layer.base_layer.weight + 2.0 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(merged_state_dict(family.transformer)["transformer_blocks.0.attn1.to_q.weight"],
                               expected.detach())

    path = family.export(tmp_path, module.adapter)
    assert path == tmp_path / "transformer"
    assert any("lora_" in n for n, _ in family.transformer.named_parameters())  # the training model is untouched
    kwargs = dict(prompt=PROMPTS[0], height=32, width=64, num_inference_steps=3, guidance_scale=2.0,
                  max_sequence_length=16, output_type="np")
    base = CogView3PlusPipeline.from_pretrained(tiny_cogview3plus)
    base.set_progress_bar_config(disable=True)
    merged = CogView3PlusPipeline.from_pretrained(
        tiny_cogview3plus, transformer=CogView3PlusTransformer2DModel.from_pretrained(path))
    merged.set_progress_bar_config(disable=True)
    images = {name: pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
              for name, pipe in (("base", base), ("merged", merged), ("trained", family.pipe))}
    np.testing.assert_allclose(images["merged"], images["trained"], atol=1e-4)
    assert np.abs(images["merged"] - images["base"]).max() > 1e-3

    # The LoRA itself is exported too, and starts (or evaluates) another run with `adapter_path`.
    fresh = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p))
    fresh.family.load_adapter(tmp_path, fresh.adapter)
    reloaded = fresh.family.pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(reloaded, images["trained"], atol=1e-5)
