"""What the kit trims from Lightning's per-step loop (finetune/loop.py): the same behaviour, less per-hook work."""

from __future__ import annotations

import lightning as L
import pytest
from conftest import compose
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import SimpleProfiler

from finetune.loop import QuietProfiler, StepCheckpoint, quiet_profiler
from finetune.settings.check import config_problems


def test_the_quiet_profiler_hands_back_one_inert_context_manager():
    profiler = quiet_profiler()
    first, second = profiler.profile("[Callback]a.on_train_batch_end"), profiler.profile("other")
    assert first is second
    with first as value:
        assert value is None
    with pytest.raises(ValueError):  # it never swallows an exception
        with profiler.profile("x"):
            raise ValueError("raised inside")


def test_the_checkpoint_state_key_is_lightnings_computed_once(tmp_path):
    settings = dict(dirpath=str(tmp_path), every_n_train_steps=250, save_last=True, save_top_k=1)
    ours, theirs = StepCheckpoint(**settings), ModelCheckpoint(**settings)
    assert ours.state_key == theirs.state_key  # checkpoints keep the callback's state under the same name
    expected, calls = theirs.state_key, []
    real = ModelCheckpoint._generate_state_key
    ModelCheckpoint._generate_state_key = lambda self, **kw: calls.append(kw) or real(self, **kw)
    try:
        fresh = StepCheckpoint(**settings)
        for _ in range(5):
            assert fresh.state_key == expected
    finally:
        ModelCheckpoint._generate_state_key = real
    assert len(calls) == 1


@pytest.mark.parametrize("profiler", [None, "simple"])
def test_the_trainer_profiler_setting(profiler, tmp_path):
    overrides = ["recipe=cogvideox_lora", "preset=tiny", f"run_dir={tmp_path}"]
    cfg = compose(overrides + ([f"trainer.profiler={profiler}"] if profiler else []))
    assert not config_problems(cfg)
    from finetune.run import quiet_profiler as used  # what build passes when the setting is null

    extra = {} if cfg.trainer.get("profiler") else {"profiler": used()}
    trainer = instantiate(cfg.trainer, default_root_dir=str(tmp_path), logger=False, **extra)
    assert isinstance(trainer.profiler, SimpleProfiler if profiler else QuietProfiler)
    assert isinstance(instantiate(cfg.callbacks.checkpoint), StepCheckpoint)


def test_the_checkpoint_keeps_modelcheckpoints_ranges(tmp_path):
    cfg = compose(["recipe=cogvideox_lora", "preset=tiny", f"run_dir={tmp_path}", "callbacks.checkpoint.save_top_k=-3"])
    problems = config_problems(cfg)
    assert any("save_top_k" in problem for problem in problems), problems
