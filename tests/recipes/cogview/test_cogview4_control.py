"""CogView4 control: the tiny control checkpoint, the transformer input pinned to the installed
`CogView4ControlPipeline`, the from-base start (widened patch embedding) at step 0, the exports reloaded by stock
diffusers (fused transformer), `apply_control_lora`, `adapter_path`, `cogft merge` and `inspect`, validation samples
with their control image, and the docs' python block. Golden losses: tests/test_golden.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import perturb_trainable
from finetune.adapters import Full, LoRA
from finetune.family import GenerationRequest
from finetune.module import FinetuneModule
from PIL import Image
from recipes.cogview.cogview4 import CogView4
from recipes.cogview.cogview4_control import CogView4Control, apply_control_lora

PROMPTS = ["a red circle on a white background", "黑色背景上的一个黄色圆形 and a blue square"]
SIZES = dict(dtype="fp32", height=32, width=64, max_sequence_length=64)


def tiny(path: str = "tiny", **kwargs) -> CogView4Control:
    return CogView4Control(path=path, **SIZES, **kwargs)


def control_picture(seed: int = 1, height: int = 32, width: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def pixels(picture: Image.Image) -> torch.Tensor:
    from datamodules.images import resize_crop

    return resize_crop(picture, picture.height, picture.width)


def fixed_batch(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(2, 3, 32, 64, generator=g) * 2 - 1,
            "control_image": torch.stack([pixels(control_picture(1)), pixels(control_picture(2))]),
            "prompt": list(PROMPTS), "key": ["k0", "k1"]}


def transformer_output(transformer, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([[32.0, 64.0]])
    return transformer(hidden_states=torch.randn(1, 32, 4, 8, generator=g),
                       encoder_hidden_states=torch.randn(1, 16, 32, generator=g), timestep=torch.tensor([400.0]),
                       original_size=size, target_size=size, crop_coords=torch.zeros(1, 2), return_dict=False)[0]


def test_tiny_control_checkpoint_has_the_hub_layout(cache_dir):
    from diffusers import CogView4ControlPipeline

    family = tiny()
    index = json.loads((Path(family.checkpoint_dir) / "model_index.json").read_text())
    assert index["_class_name"] == "CogView4ControlPipeline"
    pipe = CogView4ControlPipeline.from_pretrained(family.checkpoint_dir)
    assert (pipe.transformer.config.in_channels, pipe.transformer.config.out_channels) == (32, 16)
    assert type(family.pipe).__name__ == "CogView4ControlPipeline" and not family.widened


def test_transformer_input_is_the_pipelines(cache_dir):
    """Record what CogView4ControlPipeline gives its transformer for a control image; training's control latents for
    the same image (the data module's pixels, the same draw) are its channels 16..31, and the loss's transformer
    input is `cat([x_t, control latents])`."""
    family = tiny()
    picture = control_picture(5)
    seen = []
    forward = family.transformer.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["hidden_states"].clone())
        return forward(*args, **kwargs)

    family.transformer.forward = spy
    torch.manual_seed(11)  # the pipeline's `latent_dist.sample()` draws from the global generator, before the latents
    family.pipe(PROMPTS[0], control_image=picture, height=32, width=64, num_inference_steps=2, guidance_scale=1.0,
                generator=torch.Generator().manual_seed(0))
    pipeline_control = seen[0][:, 16:]
    encoded = family.encode({"image": pixels(picture)[None], "control_image": pixels(picture)[None],
                             "prompt": [PROMPTS[0]], "key": ["k"]})
    torch.manual_seed(11)
    training_control = family.control_latents(encoded)
    torch.testing.assert_close(training_control, pipeline_control, rtol=1e-5, atol=1e-5)

    seen.clear()
    drawn = []
    control_latents = family.control_latents
    family.control_latents = lambda enc: drawn.append(control_latents(enc)) or drawn[-1]
    noise, sigmas = torch.randn(1, 16, 4, 8), torch.tensor([0.4])
    x0 = family.sample_latents(encoded)
    family.per_sample_loss(encoded, noise=noise, sigmas=sigmas, x0=x0)
    shifted = family.flow.shifted(sigmas, family.shift_mu(32, 64)).view(1, 1, 1, 1)
    torch.testing.assert_close(seen[0], torch.cat([(1 - shifted) * x0 + shifted * noise, drawn[0]], dim=1))


def test_from_base_start_is_the_base_model_at_step_0(cache_dir):
    """The widened patch embedding's control weights are zero: for any control latents the transformer gives the
    base CogView4's output on the image channels, and the loss is the base model's."""
    base = CogView4(path="tiny", **SIZES)
    family = tiny("tiny-base")
    assert family.widened and family.transformer.config.in_channels == 32
    assert family.transformer.patch_embed.proj.weight[:, 64:].abs().max() == 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 4, 8, generator=g)
    control = torch.randn(2, 16, 4, 8, generator=g) * 3
    text = torch.randn(2, 16, 32, generator=g)
    size = torch.tensor([[32.0, 64.0]] * 2)
    common = dict(encoder_hidden_states=text, timestep=torch.tensor([300.0, 800.0]), original_size=size,
                  target_size=size, crop_coords=torch.zeros(2, 2), return_dict=False)
    with torch.no_grad():
        ours = family.transformer(hidden_states=torch.cat([x, control], 1), **common)[0]
        theirs = base.transformer(hidden_states=x, **common)[0]
    diff = (ours - theirs).abs().max().item()
    print(f"from-base step 0: max |control - base| transformer output = {diff:.3g}")
    assert diff <= 1e-6
    batch = fixed_batch()
    torch.manual_seed(0)
    with torch.no_grad():
        loss = family.training_loss(family.encode(batch))
        torch.manual_seed(0)
        encoded = base.encode(batch)
        expected = base.training_loss(encoded)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


def test_from_base_lora_must_train_the_widened_patch_embedding(cache_dir):
    from finetune.settings.check import ConfigError

    module = FinetuneModule(tiny("tiny-base"), LoRA(rank=4, alpha=8), optimizer=lambda p: torch.optim.AdamW(p))
    with pytest.raises(ConfigError, match=r"adapter.modules=\[patch_embed.proj\]"):
        module.family.training_loss(module.family.encode(fixed_batch()))


@pytest.fixture(scope="module", params=["tiny", "tiny-base"])
def trained_lora(request, cache_dir, tmp_path_factory):
    """A LoRA moved off its init (both starts; from base with the widened patch embedding trained fully), exported."""
    modules = [] if request.param == "tiny" else ["patch_embed.proj"]
    module = FinetuneModule(tiny(request.param), LoRA(rank=4, alpha=8, modules=modules or None),
                            optimizer=lambda p: torch.optim.AdamW(p))
    perturb_trainable(module.family.transformer, scale=0.1)
    out = tmp_path_factory.mktemp(f"control_lora_{request.param}")
    file = module.family.export(out, module.adapter)
    return request.param, module, out, file


def test_fused_export_in_stock_control_pipeline_reproduces_the_trained_model(trained_lora):
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel

    start, module, out, _ = trained_lora
    transformer = CogView4Transformer2DModel.from_pretrained(out / "transformer")
    assert transformer.config.in_channels == 32
    pipe = CogView4ControlPipeline.from_pretrained(module.family.checkpoint_dir, transformer=transformer)
    with torch.no_grad():
        trained, loaded = transformer_output(module.family.transformer), transformer_output(pipe.transformer)
    print(f"{start}: fused export max |diff| = {(trained - loaded).abs().max().item():.3g}")
    torch.testing.assert_close(loaded, trained, rtol=1e-5, atol=1e-5)
    kwargs = dict(prompt=PROMPTS[1], control_image=control_picture(3), height=32, width=64, num_inference_steps=2,
                  guidance_scale=2.0, output_type="np")
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    ours = module.family.pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    torch.manual_seed(0)
    theirs = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(theirs, ours, atol=1e-4)


def test_apply_control_lora_equals_the_fused_export(trained_lora):
    """The LoRA file through PEFT onto a stock pipeline (a base one is widened by the file's patch embedding)."""
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel
    from safetensors import safe_open

    start, module, out, file = trained_lora
    with safe_open(str(file), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("transformer.") for k in keys)
    assert ("transformer.patch_embed.proj.weight" in keys) == (start == "tiny-base")
    pipe = CogView4ControlPipeline.from_pretrained(module.family.checkpoint_dir)
    assert pipe.transformer.config.in_channels == (32 if start == "tiny" else 16)
    apply_control_lora(pipe, out)
    fused = CogView4Transformer2DModel.from_pretrained(out / "transformer")
    with torch.no_grad():
        torch.testing.assert_close(transformer_output(pipe.transformer), transformer_output(fused),
                                   rtol=1e-5, atol=1e-5)
        pipe.transformer.disable_adapters()
        assert (transformer_output(pipe.transformer) - transformer_output(fused)).abs().max() > 1e-4


def test_adapter_path_and_cogft_merge_reload_the_lora(trained_lora, tmp_path):
    from diffusers import CogView4ControlPipeline
    from finetune.cogft import main as cogft

    start, module, out, _ = trained_lora
    fresh = FinetuneModule(tiny(start), LoRA(rank=4, alpha=8, modules=module.adapter.modules),
                           optimizer=lambda p: torch.optim.AdamW(p))
    fresh.family.load_adapter(out, fresh.adapter)
    with torch.no_grad():
        expected = transformer_output(module.family.transformer)
        torch.testing.assert_close(transformer_output(fresh.family.transformer), expected, rtol=1e-5, atol=1e-5)
    extra = [] if start == "tiny" else ["--model", "tiny-base"]
    cogft(["merge", "--recipe", "cogview4_control_lora", "--preset", "tiny", "--lora", str(out),
           "--out", str(tmp_path / "merged"), *extra])
    merged = CogView4ControlPipeline.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(transformer_output(merged.transformer), expected, rtol=1e-5, atol=1e-5)


def test_sft_export_from_base_reloads_widened(cache_dir, tmp_path):
    from diffusers import CogView4Transformer2DModel

    module = FinetuneModule(tiny("tiny-base"), Full(), optimizer=lambda p: torch.optim.AdamW(p))
    perturb_trainable(module.family.transformer, scale=0.02)
    path = module.family.export(tmp_path, module.adapter)
    loaded = CogView4Transformer2DModel.from_pretrained(path)
    assert loaded.config.in_channels == 32
    with torch.no_grad():
        torch.testing.assert_close(transformer_output(loaded), transformer_output(module.family.transformer))


def test_inspect_knows_a_control_lora():
    from finetune.families import recognize
    from finetune.lora_formats.files import LoraFile

    attention = {f"transformer.transformer_blocks.0.attn1.{m}.lora_{ab}.weight": torch.zeros(s)
                 for m in ("to_q", "to_k") for ab, s in (("A", (8, 4096)), ("B", (4096, 8)))}
    control = {**attention, "transformer.patch_embed.proj.weight": torch.zeros(4096, 128),
               "transformer.patch_embed.proj.bias": torch.zeros(4096)}
    assert recognize(LoraFile(Path("x"), control)) == ("cogview4_control", "CogView4-6B-Control")
    assert recognize(LoraFile(Path("x"), attention))[0] == "cogview4"  # attention only: any CogView4 LoRA
    assert CogView4.recognize_lora({k: tuple(v.shape) for k, v in control.items()}) is None


def test_validation_samples_keep_their_control_image(cache_dir, tmp_path):
    from finetune.callbacks import generation_requests
    from finetune.media import condition_path, save_samples

    control_picture(4).save(tmp_path / "control.png")
    requests = generation_requests([{"prompt": PROMPTS[0], "control_image": str(tmp_path / "control.png")}])
    assert requests == [GenerationRequest(PROMPTS[0], media={"control_image": str(tmp_path / "control.png")})]
    family = tiny()
    (sample,) = family.generate(requests, seed=3, num_inference_steps=2)
    assert sample.kind == "image" and sample.data.size == (64, 32)
    (path,) = save_samples([sample], tmp_path / "samples")
    saved = np.asarray(Image.open(condition_path(path)))
    assert np.array_equal(saved, np.asarray(control_picture(4)))
    with pytest.raises(ValueError, match="control_image"):
        family.generate([GenerationRequest(PROMPTS[0])], seed=3, num_inference_steps=2)


def test_docs_load_block_runs(trained_lora):
    """docs/cogview.md's `load-control` block with the tiny checkpoint of this start (a base one: the fused
    transformer and `apply_control_lora` bring the widened patch embedding) and this export."""
    from test_readme import block_after

    _, module, out, _ = trained_lora
    snippet = block_after("load-control", "docs/cogview.md")
    snippet = snippet.replace('"THUDM/CogView4-6B-Control"', repr(module.family.checkpoint_dir)).replace(
        '"outputs/cogview4_control_lora/RUN/export"', repr(str(out))).replace("torch.bfloat16", "torch.float32")
    scope: dict = {}
    exec(snippet, scope)
    with torch.no_grad():
        torch.testing.assert_close(transformer_output(scope["pipe"].transformer),
                                   transformer_output(module.family.transformer), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(transformer_output(scope["lora_pipe"].transformer),
                                   transformer_output(module.family.transformer), rtol=1e-5, atol=1e-5)


def test_control_latents_come_from_the_encoded_cache(cache_dir, tmp_path):
    """The control's posterior is cached with the image's (canny demo data): the epoch read from the cache, with the
    encoders gone, has the encoders' losses."""
    from datamodules.images import ImageDataModule
    from finetune.cache import EncodedCache, precompute, serve_encoded

    family = tiny()
    data = ImageDataModule(root="demo", batch_size=2, demo_count=4, control="canny")
    data.connect(CogView4Control.data_processor(bucket_pixels=4096, min_side=32, max_side=64, max_pixels=4096))
    data.setup()
    batches = list(data.train_dataloader())

    def epoch(batches, encode) -> torch.Tensor:
        torch.manual_seed(0)
        with torch.no_grad():
            return torch.tensor([family.training_loss(encode(b)).item() for b in batches])

    first = epoch(batches, family.encode)
    cache = EncodedCache(tmp_path, family.cache_namespace())
    assert precompute(cache, data, family.encode) == 4
    key = data.sample_index()[0][0]
    assert "|control=canny:" in key and cache.read(key)["control_mean"].shape[0] == 16

    def fail(*args, **kwargs):
        raise AssertionError("an encoder ran although the cache holds every sample")

    family.vae.encode = fail
    serve_encoded(data, cache)
    torch.testing.assert_close(epoch(list(data.train_dataloader()), lambda b: b), first, rtol=1e-5, atol=1e-6)
