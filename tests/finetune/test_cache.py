"""Encode once (finetune/cache.py): the precompute pass writes each sample once and resumes, its keys re-encode only
what changed, and training reads the cache without decoding media or running an encoder, with the losses of the
on-the-fly path (`module.cache=off`). DDP: tests/finetune/test_engine.py; CogView4's padded prompts: tests/recipes/cogview/test_cogview4.py."""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
from test_cogvideox_objective import fixed_batch, tiny_family
from test_golden import recipe_losses

from datamodules.demo_videos import write_demo_videos
from datamodules.video import VideoDataModule
from finetune.cache import EncodedCache, encoded_cache, files_fingerprint, precompute, serve_encoded
from finetune.checkpointing import kit_version
from finetune.family import ModelFamily
from recipes.cogvideox.family import CogVideoX


def video_data(root: str = "demo", batch_size: int = 1) -> VideoDataModule:
    data = VideoDataModule(root=root, demo_count=4, batch_size=batch_size, num_workers=0)
    data.connect(CogVideoX.data_processor(CogVideoX.local_checkpoint("tiny"), height=32, width=32, num_frames=9))
    data.setup()
    return data


class EncodeSpy:
    """`family.encode`, counting the samples it encodes; raises `stop_after` calls in (an interrupted pass)."""

    def __init__(self, family, stop_after: int | None = None):
        self.family, self.stop_after, self.prompts, self.calls = family, stop_after, [], 0

    def __call__(self, batch: dict) -> dict:
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt("interrupted")
        self.calls += 1
        self.prompts += list(batch["prompt"])
        return self.family.encode(batch)


def entries(directory) -> list:
    return sorted(directory.rglob("*.safetensors"))


def test_precompute_writes_each_sample_once_and_a_second_pass_encodes_nothing(tiny_cogvideox, tmp_path):
    family, data = tiny_family(), video_data(batch_size=2)
    cache = EncodedCache(tmp_path, family.cache_namespace())
    spy = EncodeSpy(family)
    assert precompute(cache, data, spy) == 4 and spy.calls == 2  # two batches of 2 (one bucket)
    assert len(entries(tmp_path)) == 4
    key = data.sample_index()[0][0]
    sample = cache.read(key)
    assert set(sample) == {"latent_mean", "latent_logvar", "prompt_embeds"}
    assert sample["latent_mean"].shape == (16, 3, 4, 4) and sample["prompt_embeds"].shape[0] == 16
    again = EncodeSpy(family)
    assert precompute(cache, video_data(), again) == 0 and again.calls == 0
    # what the data module yields once encoded: the cached tensors by key, in the training order, no video
    serve_encoded(data, cache)
    batch = next(iter(data.train_dataloader()))
    assert set(batch) == {"latent_mean", "latent_logvar", "prompt_embeds", "key"}
    assert batch["latent_mean"].shape == (2, 16, 3, 4, 4)


def test_the_cached_encodings_give_the_loss_of_the_encoders(tiny_cogvideox, tmp_path):
    family, batch = tiny_family(), fixed_batch()
    cache = EncodedCache(tmp_path, family.cache_namespace())
    cache.write(batch["key"], family.encode(batch))
    read = [cache.read(key) for key in batch["key"]]
    cached = {name: torch.stack([r[name] for r in read]) for name in read[0]}
    losses = []
    for encoded in (family.encode(batch), cached):
        torch.manual_seed(0)  # the same posterior, noise and timestep draws
        losses.append(family.training_loss(encoded).item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_a_change_re_encodes_the_samples_it_affects_only(tiny_cogvideox, tmp_path):
    root = write_demo_videos(tmp_path / "clips", count=3)
    family = tiny_family()
    cache = EncodedCache(tmp_path / "encoded", family.cache_namespace())
    assert precompute(cache, video_data(str(root)), EncodeSpy(family)) == 3
    captions = (root / "prompts.txt").read_text().splitlines()
    captions[1] = "a purple star spins on the spot"
    (root / "prompts.txt").write_text("\n".join(captions) + "\n")
    spy = EncodeSpy(family)
    assert precompute(cache, video_data(str(root)), spy) == 1 and spy.prompts == [captions[1]]
    first_video = root / (root / "videos.txt").read_text().splitlines()[0]
    stat = first_video.stat()
    os.utime(first_video, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file changed on disk
    spy = EncodeSpy(family)
    assert precompute(cache, video_data(str(root)), spy) == 1 and spy.prompts == [captions[0]]
    key = video_data(str(root)).sample_index()[0][0]
    assert cache.has(key)
    namespace = family.cache_namespace()
    family.dtype_name = "bf16"  # another dtype (model, sizes, kit version) is another namespace: nothing stale is read
    assert not EncodedCache(tmp_path / "encoded", family.cache_namespace()).has(key)
    family.dtype_name, family.height = "fp32", 48
    assert family.cache_namespace() != namespace
    assert encoded_cache(family, "on", None).namespace.endswith("|kit=" + kit_version())


def test_an_interrupted_precompute_resumes(tiny_cogvideox, tmp_path):
    family, data = tiny_family(), video_data()
    cache = EncodedCache(tmp_path, family.cache_namespace())
    with pytest.raises(KeyboardInterrupt):
        precompute(cache, data, EncodeSpy(family, stop_after=2))
    assert len(entries(tmp_path)) == 2 and not list(tmp_path.rglob(".*.tmp-*"))  # whole entries only
    spy = EncodeSpy(family)
    assert precompute(cache, data, spy) == 2 and spy.calls == 2


def test_encoder_files_identify_the_model(tmp_path):
    (tmp_path / "vae").mkdir()
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(b"1234")
    before = files_fingerprint(tmp_path, ("vae", "text_encoder"))
    assert files_fingerprint(tmp_path, ("vae", "text_encoder")) == before
    weights.write_bytes(b"12345")  # a rebuilt tiny model, another snapshot
    assert files_fingerprint(tmp_path, ("vae", "text_encoder")) != before
    assert files_fingerprint(None) == "in-memory"


def test_families_without_frozen_encoders_and_cache_off_encode_every_step(tiny_cogvideox):
    class NoEncoder(ModelFamily):  # as CogVLM: encode returns the batch, no cache_namespace
        trainable_module = encode = training_loss = export = None

    assert encoded_cache(NoEncoder(), "on", None) is None and NoEncoder().encoders() == []
    family = tiny_family()
    assert encoded_cache(family, "off", None) is None and encoded_cache(family, False, None) is None
    assert encoded_cache(family, "on", None).root.name == "encoded"  # under the kit's cache root by default
    assert family.encoders() == [family.vae, family.text_encoder]
    with pytest.raises(ValueError, match="module.cache='maybe'"):
        encoded_cache(family, "maybe", None)


def test_image_to_video_keeps_the_vae_that_encodes_its_noisy_image(tiny_cogvideox):
    from test_cogvideox_i2v import fixed_batch as i2v_batch
    from test_cogvideox_i2v import tiny

    from recipes.cogvideox.i2v import CogVideoXImageToVideo

    family = tiny(CogVideoXImageToVideo, 9)
    assert family.encoders() == [family.text_encoder]
    assert "image" in family.encode(i2v_batch(9))  # cached with the rest; the VAE encodes it noisy every step
    family.cache_image_latents = True
    assert family.encoders() == [family.vae, family.text_encoder]


class EncodersParked(L.Callback):
    """During training the VAE and text encoder are out of the module tree (never moved to the accelerator)."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        assert {"vae", "text_encoder"}.isdisjoint(dict(module.family.named_children()))
        vae = module.family.__dict__.get("vae")  # not loaded (lazy encoders), or parked on the CPU
        assert (vae is None or vae.device.type == "cpu") and "latent_mean" in batch and "video" not in batch


def test_training_from_the_cache_decodes_nothing_runs_no_encoder_and_keeps_the_losses(tiny_cogvideox, tmp_path,
                                                                                     monkeypatch):
    encoded = tmp_path / "encoded"
    settings = ("data.demo_count=4", f"module.cache_dir={encoded}")
    calls = []
    encode = CogVideoX.encode
    monkeypatch.setattr(CogVideoX, "encode", lambda self, batch: calls.append(len(batch["key"])) or encode(self, batch))
    off = recipe_losses("cogvideox_lora", tmp_path / "off", "module.cache=off", *settings, steps=3)
    assert calls == [1, 1, 1] and not encoded.exists()  # every step encodes, nothing is written

    calls.clear()
    cold = recipe_losses("cogvideox_lora", tmp_path / "cold", *settings, steps=3)
    assert calls == [1, 1, 1, 1] and len(entries(encoded)) == 4  # each sample once, before training
    torch.testing.assert_close(torch.tensor(cold), torch.tensor(off), rtol=1e-5, atol=1e-6)

    def refuse(*args, **kwargs):
        raise AssertionError("training from a complete cache decoded a video or ran an encoder")

    monkeypatch.setattr("datamodules.video.read_frames", refuse)
    monkeypatch.setattr(CogVideoX, "encode", refuse)
    # max_epochs: Lightning makes the training loader before the precompute pass, to count the steps
    warm = recipe_losses("cogvideox_lora", tmp_path / "warm", *settings, "trainer.max_epochs=1",
                         "+callbacks.parked._target_=test_cache.EncodersParked", steps=3)
    torch.testing.assert_close(torch.tensor(warm), torch.tensor(off), rtol=1e-5, atol=1e-6)


def test_encode_once_parks_the_encoders_and_wraps_the_dataset_for_a_fit_only(tiny_cogvideox, tmp_path):
    from types import SimpleNamespace

    from finetune.cache import EncodedSamples, EncodeOnce

    family, data = tiny_family(), video_data()
    decoded = data.dataset
    component = EncodeOnce(family, "on", str(tmp_path))
    component.setup(SimpleNamespace(datamodule=data), "validate")
    assert not component.active and data.dataset is decoded and "vae" in dict(family.named_children())
    component.setup(SimpleNamespace(datamodule=data), "fit")
    assert component.active and isinstance(data.dataset, EncodedSamples) and data.dataset.decoded is decoded
    assert {"vae", "text_encoder"}.isdisjoint(dict(family.named_children())) and family.vae.device.type == "cpu"
    batch = fixed_batch()
    assert set(component.encode(batch)) == set(family.encode(batch))  # not serving yet: the encoders run
    component.teardown()
    assert data.dataset is decoded and {"vae", "text_encoder"} <= set(dict(family.named_children()))
