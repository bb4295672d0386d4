"""CogView4: the tiny checkpoint, the flow-matching objective pinned to the installed pipeline, padded-prompt
masking, golden losses, the latent cache, LoRA/SFT export round trips and the recipes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, compose
from finetune.adapters import Full, LoRA
from finetune.family import GenerationRequest
from finetune.module import FinetuneModule
from finetune.run import build_data, build_module
from recipes.cogview.cogview4 import CogView4

PROMPTS = ["a red circle on a white background", "黑色背景上的一个黄色圆形 and a blue square"]  # 9 and 18 tokens


@pytest.fixture(scope="session")
def tiny_cogview4(cache_dir) -> str:
    from finetune.hub import resolve_pretrained
    from recipes.cogview.cogview4_tiny import save_tiny_cogview4

    return resolve_pretrained("tiny", family="cogview4", build_tiny=save_tiny_cogview4)


def tiny_family(**kwargs) -> CogView4:
    return CogView4(path="tiny", dtype="fp32", height=64, width=64, max_sequence_length=64, **kwargs)


def fixed_batch(height=32, width=64, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(2, 3, height, width, generator=g) * 2 - 1
    return {"image": image, "prompt": list(PROMPTS), "key": ["k0", "k1"]}


def test_tiny_checkpoint_has_the_hub_layout(tiny_cogview4):
    from diffusers import CogView4Pipeline
    from transformers import PreTrainedTokenizerFast

    from recipes.diffusion.tiny_text import glm_tokenizer

    index = json.loads((Path(tiny_cogview4) / "model_index.json").read_text())
    assert index["text_encoder"] == ["transformers", "GlmModel"]
    assert index["tokenizer"] == ["transformers", "PreTrainedTokenizerFast"]
    pipe = CogView4Pipeline.from_pretrained(tiny_cogview4)
    vae = pipe.vae.config
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor, pipe.vae_scale_factor) == (16, 1.0, 0.0, 8)
    assert pipe.scheduler.config.time_shift_type == "linear" and pipe.scheduler.config.use_dynamic_shifting
    # The tokenizer handles Chinese and English and survives save/load with identical ids, padding left.
    loaded = PreTrainedTokenizerFast.from_pretrained(f"{tiny_cogview4}/tokenizer")
    fresh = glm_tokenizer()
    for text in [*PROMPTS, "未见过的字 ünïcödé"]:
        ids = fresh(text).input_ids
        assert loaded(text).input_ids == pipe.tokenizer(text).input_ids == ids
        assert loaded.decode(ids, skip_special_tokens=True) == text
    assert loaded.padding_side == "left"
    assert len(fresh(PROMPTS[1]).input_ids) > 16 > len(fresh(PROMPTS[0]).input_ids)


def test_timestep_and_noise_level_follow_the_installed_pipeline(tiny_cogview4):
    """Record what CogView4Pipeline gives the transformer at each step and the scheduler's sigma for that
    step; the family's sigma -> (timestep, noise level) mapping must reproduce both."""
    family = tiny_family()
    seen = []
    forward = family.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["timestep"].clone())
        return forward(*args, **kwargs)

    family.transformer.forward = spy
    family.pipe(PROMPTS[0], height=32, width=64, num_inference_steps=5, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0))
    sigmas = family.pipe.scheduler.sigmas[:5].double()
    timesteps = torch.stack([t[0] for t in seen]).double()
    # docs/objectives.md#cogview4: mu = sqrt(image_seq_len / 256) * 0.75 + 0.25, image_seq_len = (H/8)(W/8)/4
    mu = math.sqrt((32 // 8) * (64 // 8) / 4 / 256) * 0.75 + 0.25
    assert family.shift_mu(32, 64) == pytest.approx(mu)
    unshifted = 1.0 / (1.0 + mu * (1.0 / sigmas - 1.0))  # inverse of sigma' = mu / (mu + 1/sigma - 1)
    shifted = family.flow.shifted(unshifted, mu)
    torch.testing.assert_close(family.flow.timestep(unshifted, shifted), timesteps, rtol=0, atol=1e-3)
    torch.testing.assert_close(shifted, sigmas, rtol=0, atol=1e-6)
    assert not torch.allclose(sigmas * 1000, timesteps)  # the pipeline really does pass the unshifted value


def test_loss_is_the_reference_formula(tiny_cogview4):
    family = tiny_family()
    encoded = family.encode(fixed_batch())
    torch.manual_seed(0)
    x0 = family.sample_latents(encoded)
    noise, sigmas = torch.randn_like(x0), torch.tensor([0.2, 0.9])
    loss = family.per_sample_loss(encoded, noise=noise, sigmas=sigmas, x0=x0)

    mu = math.sqrt(4 * 8 / 4 / 256) * 0.75 + 0.25
    shifted = (mu / (mu + (1 / sigmas - 1))).view(2, 1, 1, 1)
    x_t = (1 - shifted) * x0 + shifted * noise
    embeds, mask = family.text_inputs(encoded)
    size = torch.tensor([[32.0, 64.0]] * 2)
    pred = family.transformer(hidden_states=x_t, encoder_hidden_states=embeds, timestep=sigmas * 1000,
                              original_size=size, target_size=size, crop_coords=torch.zeros(2, 2),
                              attention_mask=mask, return_dict=False)[0]
    expected = ((pred - (noise - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    cosmap = tiny_family(loss_weighting="cosmap").per_sample_loss(encoded, noise=noise, sigmas=sigmas, x0=x0)
    s = shifted.view(2)
    torch.testing.assert_close(cosmap, expected * 2 / (math.pi * (1 - 2 * s + 2 * s**2)), rtol=1e-5, atol=1e-6)


def test_prompts_are_encoded_alone_left_padded_to_16(tiny_cogview4):
    family = tiny_family()
    encoded = family.encode(fixed_batch())
    assert encoded["prompt_embeds"].shape[1] == 64
    lengths = encoded["prompt_length"].tolist()
    assert lengths == [16, 32]
    for i, prompt in enumerate(PROMPTS):
        alone, _ = family.pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=64)
        torch.testing.assert_close(encoded["prompt_embeds"][i, : lengths[i]], alone[0])
        assert encoded["prompt_embeds"][i, lengths[i]:].abs().max() == 0


def test_batch_of_different_prompt_lengths_gives_each_sample_its_loss_alone(tiny_cogview4):
    """CogKit #39: with padded prompts unmasked, batching changes (or NaNs) the loss. Fixed latents, noise
    and sigma per sample: the batch's per-sample losses equal each sample's loss alone."""
    from diffusers.models.transformers.transformer_cogview4 import CogView4AttnProcessor

    family = tiny_family()
    encoded = family.encode(fixed_batch())
    torch.manual_seed(0)
    x0 = family.sample_latents(encoded)
    noise, sigmas = torch.randn_like(x0), torch.tensor([0.3, 0.7])
    batch = family.per_sample_loss(encoded, noise=noise, sigmas=sigmas, x0=x0)
    alone = torch.cat([family.per_sample_loss({k: v[i: i + 1] for k, v in encoded.items()}, noise=noise[i: i + 1],
                                              sigmas=sigmas[i: i + 1], x0=x0[i: i + 1]) for i in range(2)])
    assert torch.isfinite(batch).all()
    torch.testing.assert_close(batch, alone, rtol=1e-5, atol=1e-6)
    # diffusers' own processor adds its 0/1 "mask" to the logits: the short prompt's loss changes.
    for block in family.transformer.transformer_blocks:
        block.attn1.set_processor(CogView4AttnProcessor())
    stock = family.per_sample_loss(encoded, noise=noise, sigmas=sigmas, x0=x0)
    assert abs(stock[0] - alone[0]) > 1e-5


def test_gradient_checkpointing_with_masked_prompts_gives_the_same_gradients(tiny_cogview4):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8, init_lora_weights="gaussian"),
                                optimizer=lambda p: torch.optim.AdamW(p), enable_gradient_checkpointing=checkpointing)
        module.train()
        assert module.family.transformer.gradient_checkpointing is checkpointing
        torch.manual_seed(5)
        module.family.training_loss(module.encode(fixed_batch())).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])


def transformer_output(transformer, seed=3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([[32.0, 64.0]])
    return transformer(hidden_states=torch.randn(1, 16, 4, 8, generator=g),
                       encoder_hidden_states=torch.randn(1, 16, 32, generator=g), timestep=torch.tensor([400.0]),
                       original_size=size, target_size=size, crop_coords=torch.zeros(1, 2), return_dict=False)[0]


def test_lora_export_round_trip_and_effect(tiny_cogview4, tmp_path):
    """rank != alpha and nonzero B: a fresh pipeline loading the export reproduces the trained transformer,
    and the LoRA changes the generated image."""
    from diffusers import CogView4Pipeline
    from safetensors import safe_open

    module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p))
    torch.manual_seed(0)
    for name, param in module.family.transformer.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0.0, 0.2)
    path = module.family.export(tmp_path, module.adapter)
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith("transformer.") for k in f.keys())
        header = f.metadata()
    meta, trained = json.loads(header["lora_adapter_metadata"]), json.loads(header["cogft_trained"])
    # alpha / rank folded into lora_B: any loader (with or without reading the header) applies the trained update
    assert (meta["transformer.r"], meta["transformer.lora_alpha"], trained["alpha"]) == (4, 4, 8)

    base = CogView4Pipeline.from_pretrained(tiny_cogview4)
    base.set_progress_bar_config(disable=True)
    kwargs = dict(prompt=PROMPTS[1], height=32, width=64, num_inference_steps=3, guidance_scale=2.0, output_type="np")
    before = base(generator=torch.Generator().manual_seed(0), **kwargs).images
    base.load_lora_weights(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(transformer_output(base.transformer), transformer_output(module.family.transformer),
                                   rtol=1e-5, atol=1e-5)
    after = base(generator=torch.Generator().manual_seed(0), **kwargs).images
    trained = module.family.pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(after, trained, atol=1e-4)
    assert np.abs(after - before).max() > 1e-3


def test_sft_export_round_trip(tiny_cogview4, tmp_path):
    from diffusers import CogView4Transformer2DModel

    module = FinetuneModule(tiny_family(), Full(), optimizer=lambda p: torch.optim.AdamW(p))
    with torch.no_grad():
        module.family.transformer.proj_out.weight.add_(0.05)
    path = module.family.export(tmp_path, module.adapter)
    loaded = CogView4Transformer2DModel.from_pretrained(path)
    with torch.no_grad():
        torch.testing.assert_close(transformer_output(loaded), transformer_output(module.family.transformer))
    assert torch.equal(loaded.proj_out.weight, module.family.transformer.proj_out.weight)


def test_generate_is_an_image_per_prompt_and_repeatable(tiny_cogview4):
    family = tiny_family()
    requests = [GenerationRequest(p) for p in PROMPTS]
    first = family.generate(requests, seed=7, num_inference_steps=2)
    second = family.generate(requests, seed=7, num_inference_steps=2)
    assert [s.kind for s in first] == ["image", "image"] and [s.caption for s in first] == PROMPTS
    assert first[0].data.size == (64, 64)
    assert all(np.array_equal(np.asarray(a.data), np.asarray(b.data)) for a, b in zip(first, second))


def test_cache_gives_the_same_epoch_without_the_encoders(tiny_cogview4, tmp_path):
    """Three buckets: each sample is encoded once (its prompt embeddings padded to `text_pad_length`, with their
    length), and the epoch read from the cache has the losses of the encoders'."""
    from datamodules.images import ImageDataModule
    from finetune.cache import EncodedCache, precompute, serve_encoded

    data = ImageDataModule(root="demo", batch_size=2, demo_count=6)
    data.connect(CogView4.data_processor(bucket_pixels=4096, min_side=32, max_side=64, max_pixels=4096))
    data.setup()
    batches = list(data.train_dataloader())
    assert {tuple(b["image"].shape[2:]) for b in batches} == {(64, 64), (32, 64), (64, 32)}
    family = tiny_family()

    def epoch(batches, encode) -> list[float]:
        torch.manual_seed(0)
        with torch.no_grad():
            return [family.training_loss(encode(b)).item() for b in batches]

    first = epoch(batches, family.encode)
    cache = EncodedCache(tmp_path, family.cache_namespace())
    assert precompute(cache, data, family.encode) == 6
    for key, _ in data.sample_index():  # stored padded, with the length that masks the padding
        entry = cache.read(key)
        assert entry["prompt_embeds"].shape[0] == family.text_pad_length
        assert 0 < int(entry["prompt_length"]) < family.text_pad_length
        assert not entry["prompt_embeds"][int(entry["prompt_length"]):].any()

    def fail(*args, **kwargs):
        raise AssertionError("an encoder ran although the cache holds every sample")

    family.vae.encode = fail
    family.text_encoder.forward = fail
    serve_encoded(data, cache)
    cached = list(data.train_dataloader())
    assert [b["key"] for b in cached] == [b["key"] for b in batches] and "image" not in cached[0]
    torch.testing.assert_close(torch.tensor(epoch(cached, lambda b: b)), torch.tensor(first), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("recipe", sorted(p.stem for p in (REPO / "conf" / "recipe").glob("cogview*.yaml")))
def test_recipes_compose_with_official_defaults_and_instantiate_tiny(recipe):
    real = compose([f"recipe={recipe}"])
    assert real.model.path.startswith("THUDM/") and real.model.dtype == "bf16" and real.optimizer.lr == 2e-5
    assert (real.model.min_side, real.model.max_side, real.model.max_pixels, real.model.bucket_multiple) == \
        (512, 2048, 2**21, 32)
    assert real.trainer.use_distributed_sampler is False
    if real.adapter._target_.endswith("LoRA"):
        assert (real.adapter.rank, real.adapter.alpha) == (128, 64)
    if "control" in recipe:  # control samples need control images: the recipe names them with its prompts
        prompts = [p if isinstance(p, str) else p.prompt for p in real.callbacks.samples.prompts]  # control: mappings
        assert any(any("\u4e00" <= c <= "\u9fff" for c in p) for p in prompts)
    else:
        assert real.callbacks.samples.prompts is None  # a user's data: validation prompts from its captions
    cfg = compose([f"recipe={recipe}", "preset=tiny"])
    if recipe.startswith("cogview4") and "control" not in recipe:  # the demo's prompts: the tiny preset's
        assert any(any("\u4e00" <= c <= "\u9fff" for c in p) for p in cfg.callbacks.samples.prompts)
    build_data(cfg)
    module = build_module(cfg)
    assert any(p.requires_grad for p in module.parameters())


def test_resume_mid_epoch_equals_uninterrupted(tiny_cogview4, tmp_path):
    """Buckets of 4, 1 and 1 images (4 batches an epoch): 3 steps, stop, resume to 6 == 6 uninterrupted
    steps, so the bucket sampler's position and the noise draws both come back from the checkpoint."""
    from finetune.run import train

    def cfg(run_dir, *extra):
        return compose(["recipe=cogview4_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}",
                        "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false", "data.demo_count=6",
                        *extra])

    full = train(cfg(tmp_path / "full", "trainer.max_steps=6"))
    train(cfg(tmp_path / "split", "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3"))
    resumed = train(cfg(tmp_path / "split", "trainer.max_steps=6", "ckpt_path=last"))
    a, b = full.trainable_state_dict(), resumed.trainable_state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
