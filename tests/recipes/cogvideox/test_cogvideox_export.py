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
    assert meta == {"transformer.r": 4, "transformer.lora_alpha": 4.0, "transformer.rank_pattern": {},
                    "transformer.alpha_pattern": {},  # diffusers 0.34-0.35 fail without the two patterns
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
    # the trained weights themselves come back: alpha / rank = 2 folded into lora_B is undone bitwise
    assert fresh.trainable_state_dict().keys() == module.trainable_state_dict().keys()
    for name, value in module.trainable_state_dict().items():
        assert torch.equal(fresh.trainable_state_dict()[name], value), name
    assert fresh.family.transformer.peft_config["default"].lora_alpha == 8
    other = FinetuneModule(tiny_family(), LoRA(rank=2, alpha=8), optimizer=lambda p: torch.optim.AdamW(p))
    with pytest.raises(ValueError, match="trained with other settings; pass adapter.rank=4"):
        other.family.load_adapter(out, other.adapter)
    other = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=4), optimizer=lambda p: torch.optim.AdamW(p))
    with pytest.raises(ValueError, match="trained with other settings; pass adapter.alpha=8"):
        other.family.load_adapter(out, other.adapter)


def test_load_adapter_with_alpha_over_rank_not_a_power_of_two(tmp_path):
    """alpha / rank = 1.5: unfolding lora_B costs at most one fp32 rounding (docs/lora-formats.md)."""
    module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=6), optimizer=lambda p: torch.optim.AdamW(p))
    perturb_trainable(module)
    module.family.export(tmp_path, module.adapter)
    fresh = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=6), optimizer=lambda p: torch.optim.AdamW(p))
    fresh.family.load_adapter(tmp_path, fresh.adapter)
    for name, value in module.trainable_state_dict().items():
        torch.testing.assert_close(fresh.trainable_state_dict()[name], value, rtol=1.2e-7, atol=0)


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


# The fields of `peft.LoraConfig` in peft 0.18.0, the kit's lower pin (`dataclasses.fields(LoraConfig)` of that
# release, read in a venv with it installed). diffusers >= 0.34 calls `LoraConfig(**lora_adapter_metadata)`
# unfiltered: a header field the user's peft lacks raises TypeError (peft 0.20 has no `kasa_config`).
PEFT_0_18_0_LORA_FIELDS = {
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping", "base_model_name_or_path", "bias",
    "corda_config", "ensure_weight_tying", "eva_config", "exclude_modules", "fan_in_fan_out", "inference_mode",
    "init_lora_weights", "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_bias", "lora_dropout", "megatron_config", "megatron_core", "modules_to_save", "peft_type", "peft_version",
    "qalora_group_size", "r", "rank_pattern", "revision", "runtime_config", "target_modules", "target_parameters",
    "task_type", "trainable_token_indices", "use_dora", "use_qalora", "use_rslora"}


def test_export_header_fields_are_known_to_the_oldest_supported_peft(trained, tmp_path):
    """Every field the export (and `cogft convert --to diffusers`) writes into `lora_adapter_metadata` is one
    peft 0.18.0's LoraConfig takes, and 0.18 is what pyproject.toml pins as the lowest peft."""
    import re

    from conftest import REPO

    from finetune.cogft import run as cogft

    pin = re.search(r'"peft>=([\d.]+)', (REPO / "pyproject.toml").read_text())[1]
    assert pin == "0.18", "the recorded field set is peft 0.18.0's: record the new lower pin's fields"
    _, _, path = trained
    converted = cogft(["convert", str(path), str(tmp_path / "c.safetensors"), "--to", "diffusers"])
    for file in (path, converted):
        with safe_open(str(file), "pt") as f:
            meta = json.loads(f.metadata()["lora_adapter_metadata"])
        fields = {key.removeprefix("transformer.") for key in meta}
        assert fields and fields <= PEFT_0_18_0_LORA_FIELDS, fields - PEFT_0_18_0_LORA_FIELDS
        from peft import LoraConfig

        LoraConfig(**{key.removeprefix("transformer."): value for key, value in meta.items()})  # and this peft
