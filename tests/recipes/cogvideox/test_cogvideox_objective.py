"""The CogVideoX objective: golden losses and the formula of docs/objectives.md#cogvideox-text-to-video."""

from __future__ import annotations


import pytest
import torch

from finetune.adapters import LoRA
from finetune.module import FinetuneModule
from recipes.cogvideox.family import CogVideoX


def tiny_family(path="tiny") -> CogVideoX:
    return CogVideoX(path=path, dtype="fp32", height=32, width=32, num_frames=9, max_sequence_length=16)


def fixed_batch(batch_size=2, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch_size, 9, 3, 32, 32, generator=g) * 2 - 1
    prompts = ["a red circle moves left on a black background", "a blue square moves up"][:batch_size]
    return {"video": video, "prompt": prompts, "key": [f"k{i}" for i in range(batch_size)]}


def reference_alphas_cumprod(shift: float, steps: int = 1000) -> torch.Tensor:
    """docs/objectives.md#cogvideox-text-to-video, written out independently of diffusers."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, steps, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    abar = abar / (shift + (1 - shift) * abar)
    root = abar.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root**2


def test_scheduler_matches_reference(tiny_cogvideox):
    family = tiny_family()
    torch.testing.assert_close(family.scheduler.alphas_cumprod, reference_alphas_cumprod(3.0))
    assert family.scheduler.config.prediction_type == "v_prediction"
    assert family.scheduler.alphas_cumprod[-1] == 0  # zero terminal SNR


def test_loss_is_the_reference_formula(tiny_cogvideox):
    family = tiny_family()
    torch.manual_seed(0)
    encoded = family.encode(fixed_batch())
    x0_shape = (2, 3, 16, 4, 4)  # [B, F, C, H, W]: 9 frames -> 3 latent frames, 32px -> 4
    noise = torch.randn(x0_shape)
    t = torch.tensor([7, 901])

    torch.manual_seed(1)
    loss = family.training_loss(encoded, noise=noise, timesteps=t)

    torch.manual_seed(1)  # same latent draw from the posterior
    x0 = family.sample_latents(encoded)
    assert x0.shape == x0_shape
    abar = reference_alphas_cumprod(3.0)[t].float().view(2, 1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    v_hat = family.transformer(hidden_states=x_t, encoder_hidden_states=encoded["prompt_embeds"], timestep=t,
                               image_rotary_emb=family.rotary_embeddings(x0), return_dict=False)[0]
    x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * v_hat
    expected = ((1 / (1 - abar)) * (x0_hat - x0) ** 2).mean(dim=(1, 2, 3, 4)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    # ... which is plain v-MSE with v = sqrt(abar) eps - sqrt(1 - abar) x0.
    v = abar.sqrt() * noise - (1 - abar).sqrt() * x0
    torch.testing.assert_close(loss, ((v_hat - v) ** 2).mean(), rtol=1e-4, atol=1e-5)


def test_rotary_embeddings_equal_the_slice_grid_at_native_size(tiny_cogvideox):
    """The official slice grid (docs/objectives.md#rotary-positions-at-non-native-sizes); training uses the pipeline's own
    function (what inference uses), which agrees at the native resolution."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    family = tiny_family()
    cfg = family.transformer.config
    latents = torch.zeros(1, 3, 16, cfg.sample_height, cfg.sample_width)
    cos, sin = family.rotary_embeddings(latents)
    grid = (cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size)
    ref_cos, ref_sin = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                                               temporal_size=3, grid_type="slice", max_size=grid)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)


def test_only_lora_is_trainable_and_frozen_parts_stay_in_eval(tiny_cogvideox):
    module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p))
    module.train()
    trainable = [n for n, p in module.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert all(p.dtype == torch.float32 for n, p in module.named_parameters() if p.requires_grad)
    assert not module.family.vae.training and not module.family.text_encoder.training
    assert module.family.transformer.training
    assert not any(p.requires_grad for p in module.family.vae.parameters())
    assert not any(p.requires_grad for p in module.family.text_encoder.parameters())


def test_trainable_params_stay_fp32_over_a_bf16_base(tiny_cogvideox):
    family = CogVideoX(path="tiny", dtype="bf16", height=32, width=32, num_frames=9, max_sequence_length=16)
    module = FinetuneModule(family, LoRA(rank=4, alpha=4), optimizer=lambda p: torch.optim.AdamW(p))
    dtypes = {p.dtype for p in module.parameters() if p.requires_grad}
    assert dtypes == {torch.float32}
    assert family.transformer.proj_out.weight.dtype == torch.bfloat16


def test_gradient_checkpointing_gives_the_same_gradients(tiny_cogvideox):
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=8, init_lora_weights="gaussian"),
                                optimizer=lambda p: torch.optim.AdamW(p),
                                enable_gradient_checkpointing=checkpointing)
        module.train()
        assert module.family.transformer.gradient_checkpointing is checkpointing
        torch.manual_seed(5)
        module.family.training_loss(module.encode(fixed_batch())).backward()
        grads.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad]))
    torch.testing.assert_close(grads[0], grads[1])


def test_cogvideox15_pads_odd_latent_frames_with_the_first():
    """CogVideoX1.5 (patch_size_t=2): 17 frames -> 5 latent frames -> 6, the first one repeated
    (official finetune), and the frame count must be 16N+1."""
    from datamodules.textfiles import DataError
    from recipes.cogvideox.family import CogVideoX15

    with pytest.raises(DataError, match=r"num_frames=9 is not 16N\+1"):
        CogVideoX15(path="tiny", dtype="fp32", height=32, width=32, num_frames=9, max_sequence_length=16)
    family = CogVideoX15(path="tiny", dtype="fp32", height=32, width=32, num_frames=17, max_sequence_length=16)
    g = torch.Generator().manual_seed(0)
    batch = {"video": torch.rand(1, 17, 3, 32, 32, generator=g) * 2 - 1, "prompt": ["a red circle"], "key": ["k"]}
    encoded = family.encode(batch)
    torch.manual_seed(0)
    latents = family.sample_latents(encoded)
    assert latents.shape[1] == 6
    torch.testing.assert_close(latents[:, 0], latents[:, 1])
    loss = family.training_loss(encoded)
    assert torch.isfinite(loss)


def test_rotary_embeddings_are_the_pipelines_at_a_non_native_size(tiny_cogvideox):
    """Recorded from a `CogVideoXPipeline` call at 32x48 (native: 32x32): training uses the pipeline's squeezed
    `linspace` grid there, not the official finetune's integer `slice` grid (docs/objectives.md#rotary-positions-at-non-native-sizes), because the
    pipeline is what runs the LoRA."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed
    from test_cogvideox_i2v import record_transformer_calls

    family = tiny_family()
    (call,) = record_transformer_calls(family.pipe, prompt="a red circle moves left", height=32, width=48,
                                       num_frames=9, generator=torch.Generator().manual_seed(0))
    latents = call["hidden_states"]
    assert latents.shape == (1, 3, 16, 4, 6)
    for ours, theirs in zip(family.rotary_embeddings(latents), call["image_rotary_emb"]):
        torch.testing.assert_close(ours, theirs)
    cfg = family.transformer.config
    official_cos, _ = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=(2, 3),
                                              temporal_size=3, grid_type="slice", max_size=(2, 3))
    assert not torch.allclose(call["image_rotary_emb"][0], official_cos)  # the documented difference


def test_buckets_are_checked_and_handed_to_the_data(tiny_cogvideox):
    from finetune.data import DataError, VideoSpec

    spec = CogVideoX.data_processor(CogVideoX.local_checkpoint("tiny"), height=32, width=32, num_frames=9).spec
    assert spec == VideoSpec(buckets=((9, 32, 32),), one_frame=True)  # buckets: null -> the validation size
    spec = CogVideoX.data_processor(CogVideoX.local_checkpoint("tiny"), height=32, width=32, num_frames=9,
                                    buckets=[[9, 32, 32], [17, 32, 48]]).spec
    assert spec == VideoSpec(buckets=((9, 32, 32), (17, 32, 48)), one_frame=True)
    with pytest.raises(DataError, match=r"model.buckets\[1\]=\[10, 32, 48\]: frames=10 is not 8N\+1.*Use 9 or 17"):
        CogVideoX.data_processor(CogVideoX.local_checkpoint("tiny"), height=32, width=32, num_frames=9, buckets=[[9, 32, 32], [10, 32, 48]])
    with pytest.raises(DataError, match=r"model.buckets\[0\]=\[9, 40, 32\]: height=40 is not a multiple of 16"):
        CogVideoX.data_processor(CogVideoX.local_checkpoint("tiny"), height=32, width=32, num_frames=9, buckets=[[9, 40, 32]])
    family = CogVideoX(path="tiny", dtype="fp32", height=32, width=32, num_frames=9, buckets=[[9, 32, 48]],
                       max_sequence_length=16)
    assert family.buckets == ((9, 32, 48),) and "((9, 32, 48),)" in family.cache_namespace()
