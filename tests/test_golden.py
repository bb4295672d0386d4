"""Golden losses of every recipe, on the user's path: the config `train.py` composes (`recipe=X preset=tiny`),
built by `finetune.run.build` and trained by Lightning through the module's `training_step` and
`configure_optimizers`, with the recipe's optimizer, LR schedule (warmup included), gradient clipping, data
order and seed. Tiny models, generated demo data, fp32 on CPU, 4 steps.

A change to a value here changes what a recipe trains: say which and why in the commit.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from conftest import REPO, compose

from finetune.run import train

RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))


class LossRecorder(L.Callback):
    """The loss `training_step` returned at each optimizer step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def recipe_losses(recipe: str, run_dir, *extra: str, steps: int = 4) -> list[float]:
    cfg = compose([f"recipe={recipe}", "preset=tiny", "logger=csv", f"run_dir={run_dir}",
                   f"trainer.max_steps={steps}", "callbacks.samples=null", "callbacks.export=null",
                   "callbacks.checkpoint=null", "+callbacks.golden._target_=test_golden.LossRecorder", *extra])
    module = train(cfg)
    (recorder,) = [c for c in module.trainer.callbacks if isinstance(c, LossRecorder)]
    return recorder.losses


# CogVideoX1.5 SFT has no recipe of its own: `adapter=full` on its LoRA recipe is its path.
GOLDEN = {
    "cogvideox15_i2v_lora": [1.292485, 0.969073, 1.092174, 1.057911],
    "cogvideox15_lora": [1.251937, 0.975958, 0.877357, 0.992788],
    "cogvideox15_lora adapter=full": [1.241104, 1.370153, 1.290218, 0.912385],
    "cogvideox_i2v_lora": [0.991070, 0.953387, 1.402374, 0.968805],
    "cogvideox_i2v_sft": [1.312388, 0.867431, 0.928626, 1.277468],
    "cogvideox_lora": [1.789254, 1.451634, 1.750631, 1.923148],
    "cogvideox_sft": [1.555340, 1.779546, 1.789141, 1.552127],
    "cogview3plus_lora": [0.781884, 0.417691, 0.646043, 0.562185],
    # CogView4 control: from the tiny control checkpoint, and from the tiny CogView4 widened (`tiny-base`); canny demo
    "cogview4_control_lora": [2.416064, 2.466778, 2.421358, 2.692073],
    "cogview4_control_lora model.path=tiny-base adapter.modules=[patch_embed.proj]":
        [2.594518, 2.473163, 2.543633, 2.384528],
    "cogview4_control_sft": [2.394984, 2.403664, 2.586497, 2.426865],
    "cogview4_control_sft model.path=tiny-base": [2.742405, 2.485524, 2.588265, 2.509662],
    "cogview4_lora": [2.666716, 2.481849, 2.648652, 2.519934],
    "cogview4_sft": [2.575119, 2.765093, 2.443840, 2.371419],
    # CogVLM: the tiny preset's demo (initializer_range 0.1, batch 32; SFT trains the whole tiny model): issue 13
    "cogvlm2_captcha_lora": [5.110301, 4.919862, 4.717271, 4.631626],
    "cogvlm_captcha_lora": [4.704431, 4.483114, 4.187825, 4.062145],
    "cogvlm_captcha_sft": [4.704431, 3.715726, 3.327112, 3.122483],
}


def test_every_recipe_has_a_golden():
    assert set(RECIPES) <= {case.split()[0] for case in GOLDEN}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_losses(case, tmp_path):
    recipe, *extra = case.split()
    losses = recipe_losses(recipe, tmp_path, *extra)
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(GOLDEN[case]), rtol=1e-4, atol=1e-5)
