"""The EMA of the trained weights (finetune/ema.py, docs/tracking.md#ema): the closed form, off by default, resumed
bitwise from last.ckpt, exported as export/ema/ that diffusers loads, and swapped in for the samples only when asked."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import compose
from test_training import tiny_cfg

from finetune.ema import EMA, effective_decay, ema_weights
from finetune.run import train
from finetune.settings.check import ConfigError, check_config


def ema_of(module) -> EMA:
    (found,) = [c for c in module.trainer.callbacks if isinstance(c, EMA)]
    return found


class Record(L.Callback):
    """The trained parameters at the start and after each optimizer step."""

    def __init__(self):
        self.steps: list[dict[str, torch.Tensor]] = []

    def _take(self, module):
        self.steps.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})

    def on_train_start(self, trainer, module):
        self._take(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if trainer.global_step != len(self.steps) - 1:  # an optimizer step happened
            self._take(module)


def run_with(cfg, *callbacks):
    from finetune import run

    build = run.build

    def with_extra(*args, **kwargs):
        trainer, module, datamodule, ckpt = build(*args, **kwargs)
        trainer.callbacks[:0] = list(callbacks)
        return trainer, module, datamodule, ckpt

    run.build = with_extra
    try:
        return train(cfg)
    finally:
        run.build = build


@pytest.mark.parametrize("decay", ["1.0", "-0.1"])
def test_decay_out_of_range_is_refused(decay):
    with pytest.raises(ConfigError, match="callbacks.ema.decay"):
        check_config(compose(["recipe=cogvideox_lora", "preset=tiny", f"callbacks.ema.decay={decay}"]))


def test_warmup_formula():
    assert effective_decay(0.999, 0) == pytest.approx(0.1)
    assert effective_decay(0.999, 90) == pytest.approx(91 / 100)
    assert effective_decay(0.999, 10**6) == 0.999
    assert effective_decay(0.9, 0, warmup=False) == 0.9


@pytest.mark.parametrize("accumulate", [1, 2])
def test_ema_equals_the_closed_form(tmp_path, accumulate):
    """Each optimizer step (not each micro-batch): ema <- d_n ema + (1 - d_n) w, from the starting weights."""
    record = Record()
    module = run_with(tiny_cfg(tmp_path, "trainer.max_steps=4", "callbacks.ema.decay=0.5",
                               f"trainer.accumulate_grad_batches={accumulate}", "data.demo_count=8"), record)
    ema = ema_of(module)
    assert len(record.steps) == 5 and ema.updates == 4 and module.trainer.global_step == 4
    expected = {n: t.double() for n, t in record.steps[0].items()}
    for n, weights in enumerate(record.steps[1:]):
        d = min(0.5, (1 + n) / (10 + n))
        expected = {k: d * expected[k] + (1 - d) * weights[k].double() for k in expected}
    assert set(ema.shadow) == set(expected) and all(t.dtype == torch.float32 for t in ema.shadow.values())
    for k in expected:
        torch.testing.assert_close(ema.shadow[k].double(), expected[k], rtol=0, atol=1e-7, msg=k)
    # the EMA lags: it is neither the first nor the last weights
    key = next(iter(expected))
    assert not torch.equal(ema.shadow[key], record.steps[-1][key])
    assert not torch.equal(ema.shadow[key], record.steps[0][key])


def test_off_by_default(tmp_path):
    cfg = tiny_cfg(tmp_path, "trainer.max_steps=2")
    assert cfg.callbacks.ema.decay == 0
    module = train(cfg)
    assert ema_of(module).shadow is None
    assert not (tmp_path / "export" / "ema").exists() and (tmp_path / "export").is_dir()
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert not any("EMA" in key for key in ckpt["callbacks"])
    with ema_weights(module.trainer, module) as swapped:
        assert swapped is False


def test_resume_continues_the_ema_bitwise(tmp_path):
    """6 steps == 3 steps, stop (last.ckpt, as after a SIGKILL), resume to 6: the same EMA, bitwise, on CPU."""
    full = train(tiny_cfg(tmp_path / "full", "trainer.max_steps=6", "callbacks.ema.decay=0.9"))
    train(tiny_cfg(tmp_path / "split", "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3",
                   "callbacks.ema.decay=0.9"))
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    state = ckpt["callbacks"]["EMA"]
    assert state["updates"] == 3 and len(state["shadow"]) == 1
    resumed = train(tiny_cfg(tmp_path / "split", "trainer.max_steps=6", "ckpt_path=last", "callbacks.ema.decay=0.9"))
    a, b = ema_of(full), ema_of(resumed)
    assert a.updates == b.updates == 6 and a.shadow.keys() == b.shadow.keys()
    for key in a.shadow:
        assert torch.equal(a.shadow[key], b.shadow[key]), key
    assert any(not torch.equal(a.shadow[k], state["shadow"][0][k]) for k in a.shadow)  # it moved after the resume


def test_ema_export_loads_in_diffusers(tmp_path, tiny_cogvideox):
    from diffusers import CogVideoXPipeline

    module = train(tiny_cfg(tmp_path, "trainer.max_steps=4", "callbacks.ema.decay=0.9",
                            "callbacks.export.formats=[diffusers,comfy]"))
    ema = ema_of(module)
    files = sorted(p.name for p in (tmp_path / "export").iterdir() if p.is_file())
    assert len(files) == 2 and sorted(p.name for p in (tmp_path / "export" / "ema").iterdir()) == files
    trained = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    pipe.load_lora_weights(tmp_path / "export" / "ema", adapter_name="ema")
    loaded = {k: v for k, v in pipe.transformer.state_dict().items() if ".lora_" in k}
    assert len(loaded) == len(ema.shadow)
    scale = module.adapter.alpha / module.adapter.rank  # the export folds alpha / rank into lora_B (exactly)
    for name, average in ema.shadow.items():
        key = name.removeprefix("family.transformer.").replace(".default.", ".ema.")
        assert torch.equal(loaded[key].float(), average * scale if ".lora_B." in name else average), key
        assert not torch.equal(average, trained[name])  # the EMA, not the trained weights
    # and the trained weights are back in the module after the export
    assert all(torch.equal(p, trained[n]) for n, p in module.named_parameters() if p.requires_grad)


class Spy(L.Callback):
    """The trained weights the samples see (ValidationSamples after this callback's hook)."""

    def __init__(self):
        self.seen = []

    def on_train_end(self, trainer, module):
        from finetune.callbacks import ValidationSamples

        (samples,) = [c for c in trainer.callbacks if isinstance(c, ValidationSamples)]
        generate = module.family.generate

        def spy(*args, **kwargs):
            self.seen.append({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad})
            return []

        module.family.generate = spy
        samples._write = lambda *a: None
        samples._sample(trainer, module)
        module.family.generate = generate


@pytest.mark.parametrize("validate_with_ema", [False, True])
def test_samples_use_the_ema_only_when_asked(tmp_path, validate_with_ema):
    spy = Spy()
    module = run_with(tiny_cfg(tmp_path, "trainer.max_steps=3", "callbacks.ema.decay=0.9",
                               f"callbacks.ema.validate_with_ema={validate_with_ema}"), spy)
    ema = ema_of(module)
    (seen,) = spy.seen
    for name, p in module.named_parameters():
        if p.requires_grad:
            assert torch.equal(seen[name], ema.shadow[name] if validate_with_ema else p.detach()), name
            assert not torch.equal(ema.shadow[name], p.detach())
