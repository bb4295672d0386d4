"""The exported LoRA loads in diffusers unchanged and reproduces the training model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import perturb_trainable
from safetensors import safe_open
from test_cogvideox_objective import tiny_family

from finetune.adapters import LoRA
from finetune.module import FinetuneModule
from recipes.cogvideox.family import CogVideoX


@pytest.fixture(scope="module")
def trained(tiny_cogvideox, tmp_path_factory):
    torch.manual_seed(0)
    # rank != alpha: a loader that ignored the metadata would scale the update by 1 instead of 8/4.
    module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8, init_lora_weights="gaussian"),
                            optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2))
    perturb_trainable(module)
    out = tmp_path_factory.mktemp("lora")
    path = module.family.export(out, module.adapter)
    return module, out, path


def transformer_inputs(family: CogVideoX):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 3, 16, 4, 4, generator=g)
    text = torch.randn(1, 16, 32, generator=g)
    return dict(hidden_states=x, encoder_hidden_states=text, timestep=torch.tensor([500]),
                image_rotary_emb=family.rotary_embeddings(x), return_dict=False)


def test_export_writes_diffusers_keys_and_metadata(trained):
    module, _, path = trained
    assert path.name == "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())
        header = f.metadata()
        tensors = {k: f.get_tensor(k) for k in keys}
    meta = json.loads(header["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(".attn1.to_q.lora_A.weight" in k for k in keys) and any("to_out.0.lora_B" in k for k in keys)
    # diffusers stores the adapter config per component, keys prefixed with the component name. alpha/rank (2) is
    # folded into lora_B and the header says alpha = rank, so every loader applies strength 1 (docs/lora-formats.md)
    assert meta == {"transformer.r": 4, "transformer.lora_alpha": 4.0,
                    "transformer.target_modules": ["to_k", "to_out.0", "to_q", "to_v"]}
    assert json.loads(header["cogft_trained"]) == {"rank": 4, "alpha": 8.0, "lora_B": "multiplied by alpha / rank"}
    trained_b = {n: p for n, p in module.family.transformer.named_parameters() if "lora_B" in n}
    assert len(trained_b) == sum(".lora_B." in k for k in keys)
    for name, value in trained_b.items():
        key = "transformer." + name.replace(".default.weight", ".weight")
        assert torch.equal(tensors[key], value.detach() * 2), key


def test_diffusers_reload_reproduces_training_outputs(trained, tiny_cogvideox):
    from diffusers import CogVideoXPipeline

    module, out, _ = trained
    family = module.family
    family.eval()
    inputs = transformer_inputs(family)
    with torch.no_grad():
        expected = family.transformer(**inputs)[0]
        pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(out, adapter_name="trained")
        reloaded = pipe.transformer(**inputs)[0]
    assert (expected - base).abs().max() > 1e-3  # the LoRA does something
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)
    assert pipe.transformer.peft_config["trained"].lora_alpha == 4  # alpha / rank is in lora_B


def test_lora_changes_the_pipeline_output(trained, tiny_cogvideox):
    from diffusers import CogVideoXPipeline

    _, out, _ = trained
    pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red circle moves left", height=32, width=32, num_frames=9, num_inference_steps=2,
                  guidance_scale=1.0, max_sequence_length=16, output_type="np")
    before = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    again = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    pipe.load_lora_weights(out)
    after = pipe(generator=torch.Generator().manual_seed(0), **kwargs).frames
    assert abs(before - again).max() == 0  # the comparison is deterministic
    assert abs(before - after).max() > 1e-3


def test_load_adapter_starts_from_the_export(trained):
    """`adapter_path=DIR`: the export loads back into a fresh run's adapter, with the trained outputs."""
    module, out, _ = trained
    inputs = transformer_inputs(module.family)
    fresh = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p))
    fresh.family.load_adapter(out, fresh.adapter)
    module.family.eval(), fresh.family.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.family.transformer(**inputs)[0], module.family.transformer(**inputs)[0])
    other = FinetuneModule(tiny_family(), LoRA(rank=2, alpha=8), optimizer=lambda p: torch.optim.AdamW(p))
    with pytest.raises(ValueError, match="trained with other settings; pass adapter.rank=4"):
        other.family.load_adapter(out, other.adapter)


def test_full_export_loads_back(tiny_cogvideox, tmp_path):
    from finetune.adapters import Full

    module = FinetuneModule(tiny_family(), Full(modules=["transformer_blocks.1."]),
                            optimizer=lambda p: torch.optim.AdamW(p))
    perturb_trainable(module)
    path = module.family.export(tmp_path, module.adapter)
    assert path == tmp_path / "transformer"
    fresh = FinetuneModule(tiny_family(), Full(), optimizer=lambda p: torch.optim.AdamW(p))
    fresh.family.load_adapter(tmp_path, fresh.adapter)
    inputs = transformer_inputs(module.family)
    with torch.no_grad():
        torch.testing.assert_close(fresh.family.transformer(**inputs)[0], module.family.transformer(**inputs)[0])
