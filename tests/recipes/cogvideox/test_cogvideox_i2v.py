"""CogVideoX image-to-video (5b-I2V and 1.5-I2V): the image latents and positions the installed pipeline uses, the
objective of docs/objectives.md#cogvideox-image-to-video, the size rule of the learned positional embedding, export and validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import compose, perturb_trainable
from test_cogvideox_objective import reference_alphas_cumprod

from finetune.adapters import Full, LoRA
from finetune.data import DataError, VideoSpec
from finetune.family import GenerationRequest
from finetune.module import FinetuneModule
from recipes.cogvideox.i2v import CogVideoX15ImageToVideo, CogVideoXImageToVideo

# (family, frames): 5b-I2V (VAE without invert_scale_latents, learned positional embedding) and 1.5-I2V
# (invert_scale_latents, patch_size_t=2, ofs); tiny models at 32x32.
FAMILIES = [(CogVideoXImageToVideo, 9), (CogVideoX15ImageToVideo, 17)]
IDS = ["5b_i2v", "1.5_i2v"]


def tiny(family_cls, frames, **settings):
    if issubclass(family_cls, CogVideoXImageToVideo):  # its settings have no defaults: conf/model/cogvideox_i2v.yaml's
        settings = {"buckets": None, "enable_vae_tiling": True, "image_dropout": 0.05, "cache_image_latents": False,
                    **settings}
    return family_cls(path="tiny", dtype="fp32", height=32, width=32, num_frames=frames, max_sequence_length=16,
                      **settings)


def fixed_batch(frames: int, batch_size: int = 2, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch_size, frames, 3, 32, 32, generator=g) * 2 - 1
    prompts = ["a red circle moves left on a black background", "a blue square moves up"][:batch_size]
    return {"video": video, "image": video[:, 0], "prompt": prompts, "key": [f"k{i}" for i in range(batch_size)]}


def pipeline_frames(family, frames: int) -> int:
    """The frame count `CogVideoXImageToVideoPipeline.__call__` hands `prepare_latents`: for 1.5, one more latent
    frame when the count is odd, so latent frames pair up."""
    latent_frames, p_t = (frames - 1) // 4 + 1, family.transformer.config.patch_size_t
    return frames + (p_t - latent_frames % p_t) * 4 if p_t and latent_frames % p_t else frames


@pytest.mark.parametrize("family_cls, frames", FAMILIES, ids=IDS)
def test_image_latents_equal_the_pipelines_prepare_latents(family_cls, frames):
    """Noise augmentation off (sigma 0), the same generator: the family's image latents are the pipeline's,
    `1 / scaling_factor` for 1.5 (invert_scale_latents), where the official trainers multiply."""
    family = tiny(family_cls, frames)
    image = fixed_batch(frames, batch_size=1)["image"]
    training_frames = family.sample_latents(family.encode(fixed_batch(frames, batch_size=1))).shape[1]
    ours = family.image_latents({"image": image}, frames=training_frames, sigma=torch.zeros(1),
                                generator=torch.Generator().manual_seed(0))
    _, expected = family.pipe.prepare_latents(image, 1, 16, pipeline_frames(family, frames), 32, 32, torch.float32,
                                              torch.device("cpu"), torch.Generator().manual_seed(0))
    assert ours.shape == expected.shape == (1, training_frames, 16, 4, 4)
    torch.testing.assert_close(ours, expected)

    invert = family_cls is CogVideoX15ImageToVideo
    assert family.vae.config.invert_scale_latents is invert
    posterior = family.vae.encode(image.unsqueeze(2)).latent_dist.sample(torch.Generator().manual_seed(0))
    scaling = family.vae.config.scaling_factor
    torch.testing.assert_close(expected[:, 0], (1 / scaling if invert else scaling) * posterior[:, :, 0])
    assert (expected[:, 1:] == 0).all()


def record_transformer_calls(pipe, **kwargs) -> list[dict]:
    """The keyword arguments of every transformer call during `pipe(**kwargs)`."""
    calls, forward = [], pipe.transformer.forward

    def spy(*args, **kw):
        calls.append(kw)
        return forward(*args, **kw)

    pipe.transformer.forward = spy
    try:
        pipe(**kwargs, num_inference_steps=1, guidance_scale=1.0, max_sequence_length=16, output_type="latent")
    finally:
        del pipe.transformer.forward
    return calls


@pytest.mark.parametrize("family_cls, frames, width",
                         [(CogVideoXImageToVideo, 9, 32), (CogVideoX15ImageToVideo, 17, 48)],
                         ids=["5b_i2v_native", "1.5_i2v_32x48"])
def test_training_gives_the_transformer_what_the_pipeline_gives_it(family_cls, frames, width):
    """One `pipe(image, prompt)` call, recorded: its rotary positions, image latents and `ofs` are the family's for
    latents of that size (1.5 at a size other than the training one; 5b-I2V takes only its native size)."""
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    family = tiny(family_cls, frames)
    image = torch.rand(1, 3, 32, width, generator=torch.Generator().manual_seed(1)) * 2 - 1
    (call,) = record_transformer_calls(family.pipe, image=image, prompt="a red circle moves left", height=32,
                                       width=width, num_frames=frames, generator=torch.Generator().manual_seed(0))
    hidden = call["hidden_states"]
    assert hidden.shape[2] == 32
    x_t = torch.zeros_like(hidden[:, :, :16])
    for ours, theirs in zip(family.rotary_embeddings(x_t), call["image_rotary_emb"]):
        torch.testing.assert_close(ours, theirs)
    ours = family.image_latents({"image": image}, frames=hidden.shape[1], sigma=torch.zeros(1),
                                generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, hidden[:, :, 16:])
    _, extra = family.conditioning(x_t, {"image": image})
    if family.transformer.config.ofs_embed_dim is None:
        assert call["ofs"] is None and "ofs" not in extra
    else:
        assert extra["ofs"].shape == (1,) and extra["ofs"].dtype == call["ofs"].dtype
        torch.testing.assert_close(extra["ofs"], call["ofs"])
        torch.testing.assert_close(extra["ofs"], torch.tensor([2.0]))
        # 1.5: the pipeline's slice grid is the official trainer's at every size
        cfg = family.transformer.config
        grid = (32 // 16, width // 16)
        official = get_3d_rotary_pos_embed(embed_dim=cfg.attention_head_dim, crops_coords=None, grid_size=grid,
                                           temporal_size=hidden.shape[1] // 2, grid_type="slice", max_size=grid)
        torch.testing.assert_close(call["image_rotary_emb"][0], official[0])


@pytest.mark.parametrize("family_cls, frames", FAMILIES, ids=IDS)
def test_loss_is_the_reference_formula(family_cls, frames):
    """docs/objectives.md#cogvideox-image-to-video, written out: image + exp(N(-3, 0.5)) * eps, VAE posterior draw, scaled as the pipeline
    (x 1/scaling_factor for 1.5), zeros after frame 0, on channels after x_t; `ofs` 2.0 for 1.5."""
    family = tiny(family_cls, frames, image_dropout=0.0)
    batch = fixed_batch(frames)
    encoded = family.encode(batch)
    torch.manual_seed(0)
    latent_frames = family.sample_latents(encoded).shape[1]
    noise = torch.randn(2, latent_frames, 16, 4, 4)
    t = torch.tensor([7, 901])

    torch.manual_seed(1)
    loss = family.training_loss(encoded, noise=noise, timesteps=t)

    torch.manual_seed(1)  # the same draws, in the order the step makes them
    x0 = family.sample_latents(encoded)
    sigma = torch.exp(torch.normal(mean=-3.0, std=0.5, size=(2,)))
    noisy = batch["image"] + sigma.view(2, 1, 1, 1) * torch.randn_like(batch["image"])
    image_latents = family.vae.encode(noisy.unsqueeze(2)).latent_dist.sample().permute(0, 2, 1, 3, 4)
    scaling = family.vae.config.scaling_factor
    image_latents = image_latents / scaling if family_cls is CogVideoX15ImageToVideo else image_latents * scaling
    image_latents = torch.cat([image_latents, torch.zeros(2, latent_frames - 1, 16, 4, 4)], dim=1)
    abar = reference_alphas_cumprod(1.0)[t].float().view(2, 1, 1, 1, 1)  # the 5b scheduler: snr_shift_scale 1.0
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    ofs = torch.tensor([2.0]) if family_cls is CogVideoX15ImageToVideo else None
    v_hat = family.transformer(hidden_states=torch.cat([x_t, image_latents], dim=2),
                               encoder_hidden_states=encoded["prompt_embeds"], timestep=t, ofs=ofs,
                               image_rotary_emb=family.rotary_embeddings(x0), return_dict=False)[0]
    x0_hat = abar.sqrt() * x_t - (1 - abar).sqrt() * v_hat
    expected = ((1 / (1 - abar)) * (x0_hat - x0) ** 2).mean(dim=(1, 2, 3, 4)).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_image_dropout_and_cached_image_latents():
    family = tiny(CogVideoXImageToVideo, 9, image_dropout=1.0)
    encoded = family.encode(fixed_batch(9))
    x_t = torch.zeros(2, 3, 16, 4, 4)
    assert (family.conditioning(x_t, encoded)[0][:, :, 16:] == 0).all()
    family.image_dropout = 0.0
    assert (family.conditioning(x_t, encoded)[0][:, :, 16:, 0] != 0).any()

    cached = tiny(CogVideoXImageToVideo, 9, cache_image_latents=True)
    assert cached.cache_namespace() != family.cache_namespace()
    encoded = cached.encode(fixed_batch(9))
    assert "image" not in encoded and encoded["image_latent_mean"].shape == (2, 16, 1, 4, 4)
    torch.manual_seed(0)
    latents = cached.image_latents(encoded, frames=3)
    torch.manual_seed(0)  # the clean image's posterior, no noise augmentation
    mean, logvar = encoded["image_latent_mean"], encoded["image_latent_logvar"]
    clean = (mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)) * cached.vae.config.scaling_factor
    torch.testing.assert_close(latents[:, 0], clean[:, :, 0])
    assert torch.isfinite(cached.training_loss(encoded))


def test_5b_i2v_other_sizes_fail_before_the_model_loads(tmp_path, monkeypatch):
    """The learned positional embedding takes only the checkpoint's size: `build_data` (the transformer config
    only) names the size and the fix; the pipeline is never loaded."""
    import diffusers

    from finetune.run import build_data

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(diffusers.CogVideoXImageToVideoPipeline, "from_pretrained", no_loading)
    cfg = compose(["recipe=cogvideox_i2v_lora", "preset=tiny", "model.width=48", f"run_dir={tmp_path}"])
    with pytest.raises(DataError, match=r"9 frames of 32x48.*learned positional embedding for 9 frames of 32x32 "
                                        r"only.*model.width=32"):
        build_data(cfg)
    with pytest.raises(DataError, match=r"17 frames of 32x32.*Set model.num_frames=9"):
        CogVideoXImageToVideo.data_processor(CogVideoXImageToVideo.local_checkpoint("tiny"), height=32, width=32, num_frames=17)
    with pytest.raises(DataError, match=r"model.buckets\[1\]=\[9, 48, 32\]: 9 frames of 48x32.*"
                                        r"Set model.buckets\[1\]=\[9, 32, 32\]"):
        CogVideoXImageToVideo.data_processor(CogVideoXImageToVideo.local_checkpoint("tiny"), height=32, width=32, num_frames=9,
                                             buckets=[[9, 32, 32], [9, 48, 32]])
    spec = CogVideoXImageToVideo.data_processor(CogVideoXImageToVideo.local_checkpoint("tiny"), height=32, width=32, num_frames=9).spec
    assert spec == VideoSpec(buckets=((9, 32, 32),), conditioning_image=True)
    spec = CogVideoX15ImageToVideo.data_processor(CogVideoX15ImageToVideo.local_checkpoint("tiny"), height=32, width=32, num_frames=17,
                                                  buckets=[[17, 32, 32], [33, 32, 48]]).spec
    assert spec == VideoSpec(buckets=((17, 32, 32), (33, 32, 48)), conditioning_image=True)


def test_tiny_checkpoints_have_the_hub_layouts():
    expected = {"cogvideox_i2v": {"in_channels": 32, "use_learned_positional_embeddings": True, "patch_size_t": None},
                "cogvideox15_i2v": {"in_channels": 32, "patch_size_t": 2, "ofs_embed_dim": 16}}
    for family_cls in (CogVideoXImageToVideo, CogVideoX15ImageToVideo):
        path = Path(family_cls.local_checkpoint("tiny"))
        assert path.name == family_cls.family_name  # one tiny model per family
        index = json.loads((path / "model_index.json").read_text())
        assert index["_class_name"] == "CogVideoXImageToVideoPipeline"
        assert {"tokenizer", "text_encoder", "vae", "transformer", "scheduler"} <= set(index)
        config = json.loads((path / "transformer" / "config.json").read_text())
        assert {k: config[k] for k in expected[family_cls.family_name]} == expected[family_cls.family_name]
        assert json.loads((path / "scheduler" / "scheduler_config.json").read_text())["snr_shift_scale"] == 1.0
        assert (path / "validation_image.png").is_file()


def transformer_inputs(family, frames: int) -> dict:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, frames, 32, 4, 4, generator=g)
    ofs = torch.tensor([2.0]) if family.transformer.config.ofs_embed_dim else None
    return dict(hidden_states=x, encoder_hidden_states=torch.randn(1, 16, 32, generator=g),
                timestep=torch.tensor([500]), ofs=ofs, image_rotary_emb=family.rotary_embeddings(x), return_dict=False)


@pytest.mark.parametrize("family_cls, frames", FAMILIES, ids=IDS)
def test_lora_export_loads_in_the_i2v_pipeline(family_cls, frames, tmp_path):
    """`type(pipe).save_lora_weights` of the I2V pipeline; rank != alpha, so a lost metadata would show."""
    from diffusers import CogVideoXImageToVideoPipeline

    torch.manual_seed(0)
    module = FinetuneModule(tiny(family_cls, frames), LoRA(rank=4, alpha=8, init_lora_weights="gaussian"),
                            optimizer=lambda p: torch.optim.AdamW(p))
    perturb_trainable(module)
    family = module.family
    family.export(tmp_path, module.adapter)
    family.eval()
    inputs = transformer_inputs(family, family.sample_latents(family.encode(fixed_batch(frames, 1))).shape[1])
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(family.checkpoint_dir)
    with torch.no_grad():
        expected, base = family.transformer(**inputs)[0], pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(tmp_path, adapter_name="trained")
        reloaded = pipe.transformer(**inputs)[0]
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(reloaded, expected, rtol=1e-5, atol=1e-5)
    assert pipe.transformer.peft_config["trained"].r == 4 and pipe.transformer.peft_config["trained"].lora_alpha == 4


def test_sft_export_loads_into_the_i2v_pipeline(tmp_path):
    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    module = FinetuneModule(tiny(CogVideoXImageToVideo, 9), Full(), optimizer=lambda p: torch.optim.AdamW(p))
    perturb_trainable(module)
    path = module.family.export(tmp_path, module.adapter)
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(
        module.family.checkpoint_dir, transformer=CogVideoXTransformer3DModel.from_pretrained(path))
    inputs = transformer_inputs(module.family, 3)
    module.family.eval()
    with torch.no_grad():
        torch.testing.assert_close(pipe.transformer(**inputs)[0], module.family.transformer(**inputs)[0])


def test_validation_sample_keeps_its_image_next_to_it(tmp_path, monkeypatch):
    from finetune.loggers import wandb_logger
    from finetune.media import log_samples, save_samples

    family = tiny(CogVideoXImageToVideo, 9)
    request = GenerationRequest("a red circle moves left on a black background", image="validation_image.png")
    (sample,) = family.generate([request], seed=0, num_inference_steps=1, guidance_scale=1.0)
    assert sample.data.shape == (9, 32, 32, 3) and sample.condition.size == (32, 32)
    with pytest.raises(ValueError, match=r"needs an image per prompt.*\{prompt: \.\.\., image: PATH\}"):
        family.generate([GenerationRequest("no image")], seed=0)
    with pytest.raises(FileNotFoundError, match=r"image 'nope.png' does not exist"):
        family.generate([GenerationRequest("missing", image="nope.png")], seed=0)

    monkeypatch.setenv("WANDB_MODE", "offline")
    paths = save_samples([sample], tmp_path / "samples")
    assert [p.name for p in paths] == ["00.mp4"] and (tmp_path / "samples" / "00_condition.png").is_file()
    logger = wandb_logger(save_dir=str(tmp_path), name="i2v")
    log_samples([logger], [sample], paths, step=1)
    logger.experiment.finish()
    assert list(tmp_path.glob("wandb/offline-run-*/files/media/images/val/samples_condition_*.png"))


def test_readme_snippet_loads_both_exports(tiny_cogvideox, tmp_path):
    """docs/cogvideox.md's "Loading the exports" snippet, on tiny exports of recipe=cogvideox_i2v_lora and cogvideox_sft."""
    from test_readme import block_after

    from recipes.cogvideox.family import CogVideoX

    i2v = FinetuneModule(tiny(CogVideoXImageToVideo, 9), LoRA(rank=4, alpha=2), optimizer=torch.optim.AdamW)
    i2v.family.export(tmp_path / "i2v", i2v.adapter)
    sft = FinetuneModule(tiny(CogVideoX, 9), Full(), optimizer=torch.optim.AdamW)
    sft.family.export(tmp_path / "sft", sft.adapter)
    snippet = block_after("load-cogvideox-exports")
    for old, new in [('"THUDM/CogVideoX-5b-I2V"', repr(i2v.family.checkpoint_dir)),
                     ('"THUDM/CogVideoX-2b"', repr(tiny_cogvideox)),
                     ('"outputs/cogvideox_i2v_lora/RUN/export"', repr(str(tmp_path / "i2v"))),
                     ('"outputs/cogvideox_sft/RUN/export/transformer"', repr(str(tmp_path / "sft" / "transformer"))),
                     ("torch.bfloat16", "torch.float32"), ("torch.float16", "torch.float32")]:
        assert old in snippet
        snippet = snippet.replace(old, new)
    scope: dict = {}
    exec(snippet, scope)
    assert scope["i2v"].transformer.peft_config["mine"].r == 4
    assert scope["t2v"].transformer is scope["transformer"]
    torch.testing.assert_close(scope["transformer"].proj_out.weight, sft.family.transformer.proj_out.weight)
