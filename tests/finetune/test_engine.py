"""Engine pieces shared by every family: schedules, adapters, DDP (the encoded cache: tests/finetune/test_cache.py)."""

from __future__ import annotations

import pytest
import torch
from test_cogvideox_objective import tiny_family

from finetune.adapters import Full
from finetune.schedules import warmup_schedule


@pytest.mark.parametrize("name", ["constant", "cosine"])
def test_warmup_schedules(name):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, total_steps=100, name=name, warmup_steps=10)
    lrs = []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == pytest.approx(1 / 11) and lrs[9] == pytest.approx(10 / 11) and lrs[10] == pytest.approx(1.0)
    if name == "constant":
        assert lrs[-1] == 1.0
    else:
        assert lrs[55] == pytest.approx(0.5, abs=0.02) and lrs[-1] < 0.01
    with pytest.raises(ValueError, match="use 'constant' or 'cosine'"):
        warmup_schedule(opt, 10, name="linear")


def test_warmup_ratio_overrides_steps():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, total_steps=800, name="cosine", warmup_steps=0, warmup_ratio=0.02)
    assert sched.lr_lambdas[0](15) < 1.0 and sched.lr_lambdas[0](16) == pytest.approx(1.0)


def test_full_finetune_selects_modules(tiny_cogvideox):
    family = tiny_family()
    Full(modules=["transformer_blocks.0."]).apply(family.transformer, ())
    names = [n for n, p in family.transformer.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("transformer_blocks.0.") for n in names)
    with pytest.raises(ValueError, match="matches no submodule"):
        Full(modules=["nope"]).apply(tiny_family().transformer, ())


def test_image_samples_are_saved_and_logged_to_wandb(tmp_path, monkeypatch):
    from PIL import Image

    from finetune.family import Sample
    from finetune.loggers import wandb_logger
    from finetune.media import log_samples, save_samples

    monkeypatch.setenv("WANDB_MODE", "offline")
    samples = [Sample("image", Image.new("RGB", (16, 16), (200, 10, 10)), "一个红色的方块"),
               Sample("image", Image.new("RGB", (16, 16), (10, 10, 200)), "a blue square")]
    paths = save_samples(samples, tmp_path / "samples" / "step_000001")
    assert [p.name for p in paths] == ["00.png", "01.png"]
    assert "一个红色的方块" in (tmp_path / "samples" / "step_000001" / "prompts.json").read_text(encoding="utf-8")
    logger = wandb_logger(save_dir=str(tmp_path), name="images")
    log_samples([logger], samples, paths, step=1)
    logger.experiment.finish()
    logged = list(tmp_path.glob("wandb/offline-run-*/files/media/images/val/samples_*.png"))
    assert len(logged) == 2


def test_validation_requests_carry_conditioning_media():
    from finetune.callbacks import generation_requests
    from finetune.family import GenerationRequest

    assert generation_requests(["a cat", {"prompt": "a dog runs", "image": "first_frame.png"}]) == [
        GenerationRequest("a cat"), GenerationRequest("a dog runs", image="first_frame.png")]
