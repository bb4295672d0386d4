"""Quality signals on the validation samples (finetune/quality.py, docs/tracking.md#quality-signals): motion,
saturation, colour drift and first-frame distance on pixels; the baseline drawn with the adapter off at the same
seed; the collapse and drift warnings; the signals in every logger's metrics."""

from __future__ import annotations

import csv
import inspect
import json

import numpy as np
import pytest
import torch
from conftest import compose, perturb_trainable
from PIL import Image, ImageEnhance

from finetune.adapters import Full, LoRA
from finetune.callbacks import ValidationSamples, load_baseline
from finetune.family import Sample
from finetune.quality import (color_drift, first_frame_distance, frames_of, motion, quality_warnings, sample_signals,
                              saturation)


def moving_square(frames: int = 6, size: int = 24, colour=(200, 60, 40), speed: int = 2) -> np.ndarray:
    """A coloured square sliding right by `speed` pixels a frame over a grey ramp, uint8 T x H x W x 3."""
    ramp = np.linspace(30, 160, size, dtype=np.float32)[None, :, None].repeat(size, 0).repeat(3, 2)
    clip = np.stack([ramp] * frames).astype(np.uint8)
    for t in range(frames):
        clip[t, 8:16, 1 + speed * t: 9 + speed * t] = colour
    return clip


def colour_field(frames: int = 3, size: int = 24) -> np.ndarray:
    """Smooth, muted colours drifting a little from frame to frame (channels out of phase), uint8 T x H x W x 3."""
    y, x = np.mgrid[0:size, 0:size] / size
    return np.stack([np.stack([120 + 50 * np.sin(2 * np.pi * (x + y / 2 + t / 10) + phase) for phase in (0, 2, 4)], -1)
                     for t in range(frames)]).round().astype(np.uint8)


def saturated(clip: np.ndarray, factor: float) -> np.ndarray:
    return np.stack([np.asarray(ImageEnhance.Color(Image.fromarray(f)).enhance(factor)) for f in clip])


# -- the signals ------------------------------------------------------------------------------------------------

def test_a_still_clip_has_no_motion_and_a_moving_one_has_some():
    clip = moving_square()
    still = np.stack([clip[0]] * len(clip))
    assert motion(still) == 0.0
    assert motion(clip[0]) == 0.0  # an image
    assert motion(clip) > 0.005
    assert motion(clip) == pytest.approx(motion(clip.astype(np.float32) / 255), abs=1e-6)  # uint8 and 0..1 floats
    assert motion(moving_square(speed=3)) > motion(clip)  # farther per frame


def test_raising_saturation_raises_the_saturation_and_the_drift_from_the_original():
    clip = colour_field()
    grey = np.stack([clip[0].mean(axis=-1, keepdims=True).repeat(3, -1)] * 2).astype(np.uint8)
    assert saturation(grey) == pytest.approx(0.0, abs=1e-6)
    more, much_more = saturated(clip, 1.6), saturated(clip, 3.0)
    assert saturation(clip) < saturation(more) < saturation(much_more)
    assert color_drift(clip, clip) == 0.0
    assert 0 < color_drift(more, clip) < color_drift(much_more, clip) <= 1
    # the default threshold (docs/tracking.md#quality-signals): 1.3x saturation stays under it, 2x goes over
    default = inspect.signature(ValidationSamples).parameters["max_color_drift"].default
    assert color_drift(saturated(clip, 1.3), clip) < default < color_drift(saturated(clip, 2.0), clip)
    # position does not count: the same colours elsewhere in the frame are no drift
    assert color_drift(clip[:, ::-1, ::-1], clip) == pytest.approx(0.0, abs=1e-12)
    # disjoint colours: the whole mass moved
    assert color_drift(np.zeros((2, 4, 4, 3), np.uint8), np.full((2, 4, 4, 3), 255, np.uint8)) == 1.0


def test_first_frame_distance_is_zero_for_a_clip_that_starts_with_the_condition_image():
    clip = moving_square()
    condition = Image.fromarray(clip[0])
    assert first_frame_distance(clip, condition) == pytest.approx(0.0, abs=1e-7)
    assert first_frame_distance(clip[1:], condition) > 0  # starts elsewhere
    # a condition image of another size is resized to the frame: a 2x upscale of the first frame is near it
    big = condition.resize((48, 48), Image.NEAREST)
    assert first_frame_distance(clip, big) < 0.25 * first_frame_distance(clip[1:] * 0, condition)
    signals = sample_signals("video", clip, condition, baseline=clip)
    assert set(signals) == {"motion", "saturation", "first_frame_distance", "color_drift"}
    assert set(sample_signals("image", Image.fromarray(clip[0]), baseline=clip[0])) == {"saturation", "color_drift"}
    assert sample_signals("text", "a caption") == {}
    assert frames_of(Image.fromarray(clip[0])).shape == (1, 24, 24, 3)


def test_a_motion_collapse_and_a_colour_drift_are_warned_of():
    clip = moving_square()
    still = np.stack([clip[0]] * len(clip))
    base = sample_signals("video", clip)
    collapsed = sample_signals("video", still, baseline=clip)
    [message] = quality_warnings(collapsed, base, min_motion_ratio=0.3, max_color_drift=0.5, label="prompt 0")
    assert "motion collapse" in message and "prompt 0" in message
    assert quality_warnings(sample_signals("video", clip, baseline=clip), base, 0.3, 0.5) == []
    burnt = sample_signals("video", saturated(clip, 8.0), baseline=clip)
    assert burnt["color_drift"] > 0.05
    [message] = quality_warnings(burnt, base, min_motion_ratio=0.3, max_color_drift=0.05)
    assert "colour drift" in message
    # a baseline that does not move: no collapse to tell
    assert quality_warnings(collapsed, sample_signals("video", still), 0.3, 0.5) == []


# -- the adapter switched off -----------------------------------------------------------------------------------

def test_a_lora_switched_off_computes_as_the_base_layer_and_comes_back_trainable():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = torch.randn(3, 4)
    base = net(x)
    adapter = LoRA(rank=2, alpha=2, target_modules=["0", "2"])
    adapter.apply(net, ())
    perturb_trainable(net, scale=0.5)
    trained = net(x)
    assert not torch.allclose(trained, base)
    trainable = [n for n, p in net.named_parameters() if p.requires_grad]
    with adapter.disabled(net):
        assert torch.allclose(net(x), base)
    assert torch.allclose(net(x), trained)
    assert [n for n, p in net.named_parameters() if p.requires_grad] == trainable
    assert Full().can_disable(0) and not Full().can_disable(3)
    with pytest.raises(ValueError, match="untrained"), Full().disabled(net, step=3):
        pass


# -- in a run ---------------------------------------------------------------------------------------------------

def tiny(run_dir, *extra, recipe="cogvideox_lora"):
    return compose([f"recipe={recipe}", "preset=tiny", "logger=csv", f"run_dir={run_dir}", "data.demo_count=2",
                    "callbacks.samples.generate_kwargs.num_inference_steps=1", "callbacks.export=null",
                    "callbacks.checkpoint.every_n_train_steps=100", *extra])


def metrics_rows(run_dir):
    [path] = run_dir.rglob("metrics.csv")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_the_baseline_is_the_base_model_at_the_same_seed_and_the_signals_reach_the_csv(tmp_path, monkeypatch):
    """A 2-step LoRA run, samples every step; the LoRA's weights moved before the baseline is drawn (a fresh LoRA
    is the base model anyway): the baseline must still equal the base model's sample at the seed."""
    from finetune.run import train

    drawn = {}
    original = ValidationSamples.on_train_start

    def perturbed_first(self, trainer, module):
        perturb_trainable(module.family.trainable_module(), scale=0.2)
        with torch.no_grad():
            drawn["trained"] = module.family.generate(self.requests, seed=self.seed, **self.generate_kwargs)
            with module.adapter.disabled(module.family.trainable_module()):
                drawn["base"] = module.family.generate(self.requests, seed=self.seed, **self.generate_kwargs)
        original(self, trainer, module)
        drawn["baseline"] = self.baseline_samples

    monkeypatch.setattr(ValidationSamples, "on_train_start", perturbed_first)
    warned = []
    monkeypatch.setattr("finetune.callbacks.rank_zero_warn", warned.append)
    run = train(tiny(tmp_path, "trainer.max_steps=2", "callbacks.samples.every_n_steps=1",
                     "callbacks.samples.at_end=false", "callbacks.samples.max_color_drift=0"))
    [baseline], [base], [trained] = drawn["baseline"], drawn["base"], drawn["trained"]
    assert np.array_equal(baseline.data, base.data)
    assert not np.array_equal(baseline.data, trained.data)
    assert (tmp_path / "samples" / "baseline" / "00.mp4").stat().st_size > 0
    record = json.loads((tmp_path / "samples" / "baseline" / "baseline.json").read_text())
    assert record["seed"] == 42 and record["generate_kwargs"]["num_inference_steps"] == 1

    rows = metrics_rows(tmp_path)
    value = lambda name, step: next(float(r[name]) for r in rows if r.get(name) and int(r["step"]) == step)  # noqa: E731
    assert value("val/baseline_motion", 0) == pytest.approx(motion(base.data), rel=1e-5)
    assert value("val/baseline_saturation", 0) == pytest.approx(saturation(base.data), rel=1e-5)
    for step in (1, 2):
        for name in ("val/motion", "val/saturation", "val/color_drift", "val/motion/00"):
            assert value(name, step) >= 0
        assert value("val/color_drift", step) > 0  # the trained LoRA's colours are not the base model's
    assert any("colour drift" in w for w in warned)  # max_color_drift=0: every drift is over it
    assert run.trainer.global_step == 2

    # a resumed run reads the saved baseline back instead of drawing it again
    loaded = load_baseline(tmp_path / "samples" / "baseline", record, 1)
    assert loaded[0].kind == "video" and loaded[0].data.shape == base.data.shape
    assert np.abs(loaded[0].data.astype(float) - base.data).mean() < 8  # H.264 at crf 18
    assert load_baseline(tmp_path / "samples" / "baseline", {**record, "seed": 7}, 1) is None


def test_an_image_to_video_run_logs_the_first_frame_distance(tmp_path):
    from finetune.run import train

    train(tiny(tmp_path, "trainer.max_steps=1", "callbacks.samples.every_n_steps=1", "callbacks.samples.at_end=false",
               recipe="cogvideox_i2v_lora"))
    rows = metrics_rows(tmp_path)
    names = {k for r in rows for k, v in r.items() if v}
    assert {"val/first_frame_distance", "val/baseline_first_frame_distance", "val/color_drift",
            "val/motion"} <= names
    assert (tmp_path / "samples" / "baseline" / "00_condition.png").is_file()


def test_a_resumed_run_reads_its_baseline_back_and_a_changed_seed_draws_it_again(tmp_path, monkeypatch):
    from finetune.run import train

    samples = ["callbacks.samples.every_n_steps=1", "callbacks.samples.at_end=false",
               "callbacks.checkpoint.every_n_train_steps=1"]
    train(tiny(tmp_path, "trainer.max_steps=1", *samples))
    saved = tmp_path / "samples" / "baseline" / "00.mp4"
    first = saved.stat().st_mtime_ns
    drawn = []
    original = ValidationSamples._generate
    monkeypatch.setattr(ValidationSamples, "_generate",
                        lambda self, trainer, module, adapter_off=None: drawn.append(adapter_off is not None)
                        or original(self, trainer, module, adapter_off))
    resumed = train(tiny(tmp_path, "trainer.max_steps=2", "ckpt_path=last", *samples))
    assert drawn == [False]  # step 2's samples only: the baseline came from samples/baseline/
    assert saved.stat().st_mtime_ns == first
    [callback] = [c for c in resumed.trainer.callbacks if isinstance(c, ValidationSamples)]
    assert [s.kind for s in callback.baseline_samples] == ["video"]
    rows = metrics_rows(tmp_path)
    assert any(r.get("val/color_drift") and int(r["step"]) == 2 for r in rows)
    drawn.clear()
    train(tiny(tmp_path, "trainer.max_steps=3", "ckpt_path=last", "callbacks.samples.seed=7", *samples))
    assert drawn == [True, False]  # drawn with other seeds: the saved baseline does not fit, a LoRA draws it again
    assert saved.stat().st_mtime_ns != first


def test_the_thresholds_are_checked_before_the_run(tmp_path):
    from finetune.settings.check import config_problems

    problems = config_problems(tiny(tmp_path, "callbacks.samples.min_motion_ratio=2"))
    assert problems == ["callbacks.samples.min_motion_ratio=2: expected a number in [0, 1], "
                        "e.g. callbacks.samples.min_motion_ratio=0.3"]
