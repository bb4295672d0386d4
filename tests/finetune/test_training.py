"""Training through the composed config: recipes, resume, loggers, checkpoints."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, compose
from hydra.utils import instantiate

from finetune.run import build, build_data, build_module, train

RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_instantiates(recipe):
    real = compose([f"recipe={recipe}"])
    assert real.model.path != "tiny" and real.name == recipe
    cfg = compose([f"recipe={recipe}", "preset=tiny"])
    build_data(cfg)  # the data module connected to the family's processor, checked before the model loads
    module = build_module(cfg)
    assert any(p.requires_grad for p in module.parameters())
    for callback in cfg.callbacks.values():
        instantiate(callback)


def tiny_cfg(run_dir: Path, *extra: str):
    return compose(["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}",
                    "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false",
                    "data.demo_count=4", *extra])


def trainable(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.trainable_state_dict().items()}


def test_resume_equals_uninterrupted(tmp_path):
    """3 steps, stop, resume for 3 more (mid-epoch: 4 samples per epoch) == 6 uninterrupted steps."""
    full = train(tiny_cfg(tmp_path / "full", "trainer.max_steps=6"))
    train(tiny_cfg(tmp_path / "split", "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3"))
    ckpt = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 3
    assert set(ckpt["state_dict"]) == set(full.trainable_state_dict())  # only trainable weights
    assert all("lora_" in k for k in ckpt["state_dict"])
    assert "optimizer_states" in ckpt and "lr_schedulers" in ckpt
    resumed = train(tiny_cfg(tmp_path / "split", "trainer.max_steps=6", "ckpt_path=last"))
    a, b = trainable(full), trainable(resumed)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)
    # and training did move the weights: compare against the step-3 checkpoint
    assert any((a[k] - ckpt["state_dict"][k]).abs().max() > 1e-6 for k in a)


class Crash(L.Callback):
    """Fails in the middle of training, as an out-of-memory error or a killed job would."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 3:
            raise RuntimeError("simulated crash")


def test_a_crash_leaves_a_checkpoint_to_resume_from(tmp_path):
    cfg = tiny_cfg(tmp_path, "trainer.max_steps=6", "callbacks.checkpoint.every_n_train_steps=100",
                   "+callbacks.crash._target_=test_training.Crash")
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg)
    saved = tmp_path / "checkpoints" / "on_exception.ckpt"
    assert torch.load(saved, weights_only=False, map_location="cpu")["global_step"] == 3
    resumed = train(tiny_cfg(tmp_path, "trainer.max_steps=6", f"ckpt_path={saved}"))
    assert resumed.trainer.global_step == 6


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path='last'.*run_dir="):
        build(tiny_cfg(tmp_path / "nothing", "ckpt_path=last"))


def test_unreachable_model_stops_at_once_with_the_fix(tmp_path):
    cfg = tiny_cfg(tmp_path, "model.path=THUDM/CogVideoX-2b")
    with pytest.raises(Exception, match=r"could not be reached.*model.path=DIR.*preset=tiny"):
        build(cfg)


@pytest.mark.parametrize("logger, expected", [("csv", "csv/metrics.csv"), ("tensorboard", "tensorboard")])
def test_logger_option_switches_backend(tmp_path, logger, expected):
    cfg = tiny_cfg(tmp_path, "trainer.max_steps=5", f"logger={logger}", "callbacks.stats.log_every_n_steps=5",
                   "callbacks.export.every_n_steps=2")
    train(cfg)
    assert (tmp_path / expected).exists()
    exported = sorted(p.parent.name for p in (tmp_path / "export").rglob("pytorch_lora_weights.safetensors"))
    assert exported == ["export", "step_000002", "step_000004"]  # every 2 steps and at the end
    if logger == "csv":
        header = (tmp_path / expected).read_text().splitlines()[0]
        for key in ("train/loss", "train/lr", "train/samples_per_sec", "train/peak_memory_gb"):
            assert key in header


def test_wandb_without_credentials_goes_offline(tmp_path, monkeypatch, caplog):
    from lightning.pytorch.loggers import WandbLogger

    from finetune.loggers import wandb_logger

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    said = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    said.addHandler(caplog.handler)  # Lightning's loggers need not propagate to the root caplog listens on
    try:
        logger = wandb_logger(save_dir=str(tmp_path), name="t")
    finally:
        said.removeHandler(caplog.handler)
    # a plain line, not a Python warning (that would echo the source line under it)
    said = [r.getMessage() for r in caplog.records]
    assert any(re.match(r"W&B: no credentials found .*logging offline.*wandb sync", m) for m in said), said
    assert isinstance(logger, WandbLogger) and logger._offline
