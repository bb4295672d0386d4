"""Lazy encoders (finetune/cache.py `EncodeOnce`, the families' `deferred_components`; docs/memory.md#lazy-encoders):
a warm encoded cache trains without loading a text encoder or a VAE and gives the adapter of eager encoders bit for
bit; validation takes its prompts' embeddings from the cache (the VAE decoder loads, the text encoder does not) and
draws the samples the text encoder gives; a cold run loads the encoders, encodes, and frees them before step 1;
image-to-video keeps the VAE that encodes its noisy image each step."""

from __future__ import annotations

import gc
import weakref

import lightning as L
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLCogVideoX
from transformers import T5EncoderModel
from conftest import compose

from finetune.run import train


PROMPTS = ["a red circle moves left on a black background", "a blue square moves up"]


class Loads:
    """Counts (and keeps weak references to) every VAE and text encoder `from_pretrained` builds, in the pipeline's
    loading and in the family's lazy loading alike, with the training step it happened at (None: before fit)."""

    def __init__(self, monkeypatch, classes=(AutoencoderKLCogVideoX, T5EncoderModel)):
        self.events: list[tuple[str, int | None]] = []
        self.refs: list[weakref.ref] = []
        self.step: int | None = None
        for cls in classes:
            original = cls.from_pretrained.__func__

            def load(klass, *args, _original=original, **kwargs):
                model = _original(klass, *args, **kwargs)
                self.events.append((klass.__name__, self.step))
                self.refs.append(weakref.ref(model))
                return model

            monkeypatch.setattr(cls, "from_pretrained", classmethod(load))

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def alive(self) -> list:
        gc.collect()
        return [ref() for ref in self.refs if ref() is not None]


class StepMark(L.Callback):
    """Tells `Loads` the step being trained; at the first step checks the encoders the precompute pass loaded are
    gone (`freed`) or kept (`kept`)."""

    loads: Loads | None = None
    expect_freed: bool | None = None
    seen: list = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        loads = type(self).loads
        loads.step = trainer.global_step
        if trainer.global_step == 0 and type(self).expect_freed is not None:
            type(self).seen.append(len(loads.alive()))


def run(tmp_path, name: str, encoded, *extra: str, steps: int = 2, samples: bool = False):
    settings = ["recipe=cogvideox_lora", "preset=tiny", "logger=none", f"run_dir={tmp_path / name}",
                f"trainer.max_steps={steps}", "data.demo_count=2", f"module.cache_dir={encoded}",
                "callbacks.export=null", "callbacks.checkpoint=null",
                "+callbacks.mark._target_=test_lazy_encoders.StepMark"]
    if samples:
        settings += [f"callbacks.samples.prompts={PROMPTS}", "callbacks.samples.every_n_steps=0",
                     "callbacks.samples.baseline=false"]
    else:
        settings.append("callbacks.samples=null")
    StepMark.loads.step = None
    return train(compose([*settings, *extra]))


def adapter(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.trainable_state_dict().items()}


def loaded(family) -> list[str]:
    return [name for name in ("vae", "text_encoder") if family.component_loaded(name)]


def test_a_warm_cache_loads_no_encoder_and_trains_the_adapter_of_eager_encoders(tiny_cogvideox, tmp_path,
                                                                               monkeypatch):
    encoded = tmp_path / "encoded"
    loads = StepMark.loads = Loads(monkeypatch)
    StepMark.expect_freed = None
    run(tmp_path, "cold", encoded)
    assert sorted(loads.names()) == ["AutoencoderKLCogVideoX", "T5EncoderModel"]  # once each, to encode

    loads.events.clear()
    warm = run(tmp_path, "warm", encoded)
    assert loads.events == []  # neither built, nor even their weights read
    assert loaded(warm.family) == []

    # eager: every component loaded by the pipeline as before lazy encoders, training from the same cache
    monkeypatch.setattr("recipes.diffusion.pipeline.DEFERRED", ())
    eager = run(tmp_path, "eager", encoded)
    assert sorted(loads.names()) == ["AutoencoderKLCogVideoX", "T5EncoderModel"]
    lazy_adapter, eager_adapter = adapter(warm), adapter(eager)
    assert lazy_adapter.keys() == eager_adapter.keys() and lazy_adapter
    for name, value in lazy_adapter.items():
        assert torch.equal(value, eager_adapter[name]), name


def record_generations(monkeypatch) -> list[tuple[bool, list]]:
    """Each `generate` call of the family: whether every request carried cached embeddings, and the frames."""
    from recipes.cogvideox.family import CogVideoX

    calls, generate = [], CogVideoX.generate

    def spy(self, requests, seed, **kwargs):
        samples = generate(self, requests, seed, **kwargs)
        calls.append((all(r.embeddings is not None for r in requests), [s.data for s in samples]))
        return samples

    monkeypatch.setattr(CogVideoX, "generate", spy)
    return calls


def test_validation_reads_the_prompts_from_the_cache_on_a_warm_run(tiny_cogvideox, tmp_path, monkeypatch):
    encoded = tmp_path / "encoded"
    loads = StepMark.loads = Loads(monkeypatch)
    StepMark.expect_freed = None
    calls = record_generations(monkeypatch)
    run(tmp_path, "cold", encoded, samples=True)
    # the text encoder once (samples and prompts in the precompute pass); the VAE for that pass and for validation
    assert sorted(loads.names()) == ["AutoencoderKLCogVideoX", "AutoencoderKLCogVideoX", "T5EncoderModel"]
    assert len(list(encoded.rglob("*.safetensors"))) == 2 + len(PROMPTS)  # two samples, two prompts

    loads.events.clear()
    warm = run(tmp_path, "warm", encoded, samples=True)
    # only the VAE, only at validation (after the last step): no text encoder at all
    assert loads.events == [("AutoencoderKLCogVideoX", 1)]
    assert loaded(warm.family) == []  # released after validation (module.keep_encoders=false)
    (cold_cached, cold_frames), (warm_cached, warm_frames) = calls
    assert cold_cached and warm_cached and len(warm_frames) == len(PROMPTS)
    for a, b in zip(cold_frames, warm_frames, strict=True):
        np.testing.assert_array_equal(a, b)


def test_a_new_validation_prompt_loads_the_text_encoder_for_it_alone(tiny_cogvideox, tmp_path, monkeypatch):
    encoded = tmp_path / "encoded"
    loads = StepMark.loads = Loads(monkeypatch)
    StepMark.expect_freed = None
    run(tmp_path, "cold", encoded)  # the samples only
    loads.events.clear()
    warm = run(tmp_path, "prompts", encoded, samples=True, steps=1)
    # the precompute pass encodes the new prompts with the text encoder alone; validation loads the VAE decoder
    assert loads.events == [("T5EncoderModel", None), ("AutoencoderKLCogVideoX", 0)]
    assert loaded(warm.family) == []


@pytest.mark.parametrize("keep", [False, True])
def test_a_cold_run_frees_the_encoders_before_the_first_step(tiny_cogvideox, tmp_path, monkeypatch, keep):
    loads = StepMark.loads = Loads(monkeypatch)
    StepMark.expect_freed, StepMark.seen = not keep, []
    module = run(tmp_path, "cold", tmp_path / "encoded", f"module.keep_encoders={str(keep).lower()}", steps=1)
    assert sorted(loads.names()) == ["AutoencoderKLCogVideoX", "T5EncoderModel"]  # loaded to encode
    if keep:  # parked in host memory, out of the module tree
        assert StepMark.seen == [2] and loaded(module.family) == ["vae", "text_encoder"]
        assert all(p.device.type == "cpu" for p in module.family.vae.parameters())
    else:  # nothing holds them at step 1: the weak references are dead
        assert StepMark.seen == [0] and loaded(module.family) == []


def test_image_to_video_loads_the_vae_for_its_noisy_image_unless_image_latents_are_cached(tiny_cogvideox, tmp_path,
                                                                                          caplog):
    from types import SimpleNamespace

    from test_cache import video_data
    from test_cogvideox_i2v import tiny

    from finetune.cache import EncodeOnce
    from recipes.cogvideox.i2v import CogVideoXImageToVideo

    family = tiny(CogVideoXImageToVideo, 9)
    assert loaded(family) == [] and family.deferred_components() == ("vae", "text_encoder")
    component = EncodeOnce(family, "on", str(tmp_path))
    with caplog.at_level("INFO"):
        component.setup(SimpleNamespace(datamodule=video_data()), "fit")
    # the VAE in the module tree for the whole run (the strategy moves it); the text encoder not loaded
    assert "vae" in dict(family.named_children()) and not family.component_loaded("text_encoder")
    assert "cache_image_latents=true" in caplog.text
    component.teardown()

    family = tiny(CogVideoXImageToVideo, 9)
    family.cache_image_latents = True
    component = EncodeOnce(family, "on", str(tmp_path))
    component.setup(SimpleNamespace(datamodule=video_data()), "fit")
    assert loaded(family) == [] and family.training_components() == {}
    component.teardown()


def test_outside_the_engine_a_deferred_encoder_loads_when_first_used(tiny_cogvideox):
    from test_cogvideox_objective import fixed_batch, tiny_family

    from finetune.family import GenerationRequest

    family = tiny_family()
    assert loaded(family) == [] and family.pipeline.vae is None and family.pipeline.text_encoder is None
    encoded = family.encode(fixed_batch())  # `self.vae`, `self.text_encoder`: loaded on first use
    assert loaded(family) == ["vae", "text_encoder"] and family.pipeline.vae is family.vae
    embeddings = {k: v[:1] for k, v in family.encode_prompts(PROMPTS[:1]).items()}
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0)
    from_text = family.generate([GenerationRequest(PROMPTS[0])], seed=3, **kwargs)[0].data
    assert family.release_component("text_encoder") and not family.component_loaded("text_encoder")
    from_cache = family.generate([GenerationRequest(PROMPTS[0], embeddings=embeddings)], seed=3, **kwargs)[0].data
    assert not family.component_loaded("text_encoder")  # the cached embeddings need no text encoder
    np.testing.assert_array_equal(from_cache, from_text)
    assert torch.isfinite(encoded["prompt_embeds"]).all()


@pytest.mark.parametrize("recipe", ["cogview4_lora", "cogview4_control_lora"])
def test_cogview4_trains_from_a_warm_cache_without_glm_or_vae(tmp_path, monkeypatch, recipe):
    """CogView4 (and its control subclass, whose pipeline class is attached over CogView4's): the GLM text encoder
    and the VAE load for the cold run's encoding only."""
    from diffusers import AutoencoderKL
    from transformers import GlmModel

    encoded = tmp_path / "encoded"
    loads = StepMark.loads = Loads(monkeypatch, (AutoencoderKL, GlmModel))
    StepMark.expect_freed = None
    common = (f"recipe={recipe}", "data.demo_count=2")
    run(tmp_path, "cold", encoded, *common, steps=1)
    assert sorted(loads.names()) == ["AutoencoderKL", "GlmModel"]
    loads.events.clear()
    warm = run(tmp_path, "warm", encoded, *common, steps=1)
    assert loads.events == [] and loaded(warm.family) == []


def test_host_memory_bench_counts_the_published_components():
    """bench/host_memory.py --sizes-only: the T5 v1.1 XXL encoder of CogVideoX counted from its config, by hand."""
    import sys

    sys.path.insert(0, str(__import__("conftest").REPO / "bench"))
    from host_memory import main

    rows = {row["model"]: row for row in main(["--sizes-only"])["real_size_gb"]}
    d, ff, layers, vocab = 4096, 10240, 24, 32128
    t5 = vocab * d + layers * (4 * d * d + 3 * d * ff + 2 * d) + 32 * 64 + d  # embeddings, blocks, bias, final norm
    assert rows["CogVideoX-5B"]["text_encoder"] == round(2 * t5 / 1e9, 2) == 9.52
    five = rows["CogVideoX-5B"]
    assert abs(five["eager_host_gb_per_rank"] - five["vae"] - five["text_encoder"]) < 0.02  # what lazy leaves unloaded
    assert abs(five["eager_8_ranks_gb"] - 8 * five["eager_host_gb_per_rank"]) < 0.1 and five["lazy_warm_host_gb_per_rank"] == 0
    assert rows["CogVLM-17B"]["eager_host_gb_per_rank"] == 0.0  # no encoder to defer: its ViT runs every step
    assert 12 < rows["CogView4-6B"]["transformer"] < 13.5 and 17 < rows["CogView4-6B"]["text_encoder"] < 18


def test_keep_encoders_is_a_checked_setting():
    from finetune.settings.check import config_problems

    assert config_problems(compose(["recipe=cogvideox_lora", "preset=tiny", "module.keep_encoders=maybe"])) == [
        "module.keep_encoders=maybe: expected true or false, e.g. module.keep_encoders=false"]
    assert config_problems(compose(["recipe=cogvideox_lora", "preset=tiny", "module.keep_encoders=true"])) == []


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_cogview4_samples_from_cached_prompt_embeddings_are_the_text_encoders(tmp_path, guidance):
    """CogView4 (GLM embeddings padded to a multiple of 16, the negative prompt's separately): a sample drawn from
    `encode_prompts`' embeddings, without the text encoder, is the one drawn from the prompt."""
    from test_cogview4 import tiny_family

    from finetune.family import GenerationRequest

    family = tiny_family()
    prompt = "a red square on a blue ground"
    embeddings = {k: v[:1] for k, v in family.encode_prompts([prompt]).items()}
    kwargs = dict(num_inference_steps=2, guidance_scale=guidance)
    from_text = family.generate([GenerationRequest(prompt)], seed=1, **kwargs)[0].data
    family.release_component("text_encoder")
    from_cache = family.generate([GenerationRequest(prompt, embeddings=embeddings)], seed=1, **kwargs)[0].data
    assert not family.component_loaded("text_encoder")
    np.testing.assert_array_equal(np.asarray(from_cache), np.asarray(from_text))


def test_image_to_video_warm_run_loads_the_vae_once_and_no_text_encoder(tiny_cogvideox, tmp_path, monkeypatch):
    encoded = tmp_path / "encoded"
    loads = StepMark.loads = Loads(monkeypatch)
    StepMark.expect_freed = None
    run(tmp_path, "cold", encoded, "recipe=cogvideox_i2v_lora", steps=1)
    loads.events.clear()
    warm = run(tmp_path, "warm", encoded, "recipe=cogvideox_i2v_lora", steps=1)
    assert loads.events == [("AutoencoderKLCogVideoX", None)]  # at the start, for the noisy image of every step
    assert loaded(warm.family) == ["vae"] and "vae" in dict(warm.family.named_children())


def test_a_subclass_can_attach_another_pipeline_class_and_stay_lazy():
    """What a CogView4 subclass with its own pipeline class does (`CogView4ControlPipeline`): built from
    `pipeline_components()`, the deferred components stay unloaded, with the VAE's scale factor and config."""
    from diffusers import CogView4ControlPipeline
    from test_cogview4 import tiny_family

    family = tiny_family()
    scale = family.pipeline.vae_scale_factor
    family.attach_pipeline(CogView4ControlPipeline(**family.pipeline_components()))
    assert type(family.pipeline) is CogView4ControlPipeline and loaded(family) == []
    assert family.deferred_components() == ("vae", "text_encoder") and family.pipeline.vae_scale_factor == scale
    assert family.component_config("vae").scaling_factor == family.vae.config.scaling_factor  # then loaded
    assert family.pipeline.vae is family.vae and loaded(family) == ["vae"]
