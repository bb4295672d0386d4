"""Images in CogVideoX text-to-video training (docs/cogvideox.md#images-in-video-training): a one-frame sample has
the latent frames, and the rotary positions, the installed `CogVideoXPipeline` gives `num_frames=1`; a mixed
image + video tiny run, its golden losses and its one-frame batches; image-to-video refuses images."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import compose

from finetune.data import DataError
from finetune.run import train
from recipes.cogvideox.family import CogVideoX, CogVideoX15
from recipes.cogvideox.i2v import CogVideoXImageToVideo


class StepRecorder(L.Callback):
    """The loss and the latent frame count of each optimizer step's batch."""

    def __init__(self):
        self.losses: list[float] = []
        self.frames: list[int] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))
        self.frames.append(int(batch["latent_mean"].shape[2]))  # encoded once (module.cache): [B, C, F, h, w]


@pytest.mark.parametrize("family_class, num_frames, latent_frames", [(CogVideoX, 9, 1), (CogVideoX15, 17, 2)])
def test_one_frame_latents_and_positions_are_the_pipelines(tiny_cogvideox, family_class, num_frames, latent_frames):
    """1.0: one latent frame. 1.5 (`patch_size_t=2`): the pipeline pads 1 latent frame to 2 and drops the padding
    (the first) after denoising; training repeats the first latent frame in front, so the image's latent sits where
    the pipeline keeps its output, and the rotary grid has one temporal position in both."""
    family = family_class(path="tiny", dtype="fp32", height=32, width=32, num_frames=num_frames,
                          max_sequence_length=16)
    torch.manual_seed(0)
    encoded = family.encode({"video": torch.rand(2, 1, 3, 32, 32) * 2 - 1, "prompt": ["a", "b"]})
    assert encoded["latent_mean"].shape[2] == 1  # the VAE keeps a lone frame as one latent frame
    x0 = family.sample_latents(encoded)
    generated = family.pipe("a", height=32, width=32, num_frames=1, num_inference_steps=1, guidance_scale=1.0,
                            max_sequence_length=16, output_type="latent").frames
    assert x0.shape[1] == generated.shape[1] == latent_frames
    if latent_frames == 2:
        torch.testing.assert_close(x0[:, 0], x0[:, 1])
    cos, _ = family.rotary_embeddings(x0)
    ref_cos, _ = family.pipe._prepare_rotary_positional_embeddings(32, 32, generated.shape[1], "cpu")
    torch.testing.assert_close(cos, ref_cos)
    tokens_per_frame = (32 // 8 // family.transformer.config.patch_size) ** 2
    assert cos.shape[0] == tokens_per_frame  # one temporal position
    loss = family.training_loss(encoded, noise=torch.randn_like(x0), timesteps=torch.tensor([10, 900]))
    assert torch.isfinite(loss)


@pytest.mark.parametrize("recipe", ["cogvideox_lora", "cogvideox15_lora"])
def test_mixed_image_and_video_run_golden_losses(tiny_cogvideox, tmp_path, recipe):
    """`recipe=cogvideox_lora preset=tiny` on the demo clips plus the demo images (data.image_root=demo) with half
    the steps on images: the user's path (cache, buckets, sampler, objective), fp32 CPU, 6 steps."""
    cfg = compose([f"recipe={recipe}", "preset=tiny", "logger=csv", f"run_dir={tmp_path}",
                   "trainer.max_steps=6", "callbacks.samples=null", "callbacks.export=null",
                   "callbacks.checkpoint=null", "data.demo_count=4", "data.image_root=demo", "data.image_ratio=0.5",
                   "+callbacks.steps._target_=test_cogvideox_images.StepRecorder"])
    module = train(cfg)
    (recorder,) = [c for c in module.trainer.callbacks if isinstance(c, StepRecorder)]
    frames, losses, buckets = GOLDEN[recipe]
    assert recorder.frames == frames  # a clip's latent frames (1.0: 9 frames -> 3; 1.5: 17 -> 5), an image's: 1
    torch.testing.assert_close(torch.tensor(recorder.losses), torch.tensor(losses), rtol=1e-4, atol=1e-5)
    assert sorted({tuple(r["bucket"]) for r in module.trainer.datamodule.check()}) == buckets


# Changing a value here changes what a mixed run trains: say which and why in the commit.
GOLDEN = {
    "cogvideox_lora": ([1, 3, 1, 3, 1, 1], [1.813825, 1.855309, 2.114997, 1.612725, 1.790996, 1.736049],
                       [(1, 32, 32), (9, 32, 32)]),
    "cogvideox15_lora": ([1, 5, 1, 5, 1, 1], [1.325731, 0.888392, 1.231114, 1.106054, 1.026977, 0.818694],
                         [(1, 32, 32), (17, 32, 32)]),
}


def test_image_to_video_refuses_images_before_loading(tiny_cogvideox, tmp_path):
    cfg = compose(["recipe=cogvideox_i2v_lora", "preset=tiny", "logger=csv", f"run_dir={tmp_path}",
                   "data.demo_count=2", "data.image_root=demo", "callbacks.samples=null"])
    with pytest.raises(DataError, match=r"of the samples are images .* but an image-to-video sample is the motion"):
        train(cfg)


def test_image_to_video_family_refuses_a_one_frame_batch(tiny_cogvideox):
    family = CogVideoXImageToVideo(path="tiny", dtype="fp32", height=32, width=32, num_frames=9, buckets=None,
                                   max_sequence_length=16, enable_vae_tiling=False, image_dropout=0.0,
                                   cache_image_latents=False)
    batch = {"video": torch.zeros(1, 1, 3, 32, 32), "image": torch.zeros(1, 3, 32, 32), "prompt": ["a"]}
    with pytest.raises(DataError, match="a one-frame sample .* cannot train image-to-video"):
        family.encode(batch)
