"""What a user sees: `logger=none` works, the step progress bar, and a demo console free of warnings that
nothing in a config can act on (finetune/console.py, finetune/progress.py, finetune/checkpointing.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import REPO, compose

from finetune.run import train

# README's demo command (tests/test_readme.py checks the README still says exactly this), shortened.
DEMO = [sys.executable, "train.py", "recipe=cogvideox_lora", "preset=tiny",
        "trainer.max_steps=6", "callbacks.samples.every_n_steps=3", "data.demo_count=4"]

# Each known message, as it read before it was removed at its source or silenced (finetune/console.py).
KNOWN_WARNINGS = [
    r"ckpt_path=None\)` was called without a model",      # Lightning's OnExceptionCheckpoint: implicit "last"
    r"there is no last checkpoint available",              # the same
    r"You defined a `validation_step` but have no `val_dataloader`",
    r"'set_vital' is deprecated",
    r"isinstance\(treespec, LeafSpec\)` is deprecated",
    r"module\(s\) in eval mode",
    r"The anonymous setting has no effect",
    r"litlogger",
    r"Epoch \d+/-\d+",                                     # Lightning's per-epoch bar with max_epochs=-1
    r"smaller than the logging interval",                  # Lightning counts per epoch; the kit logs by step
]

# Warnings that stay, and why: each tells the user something to do.
ALLOWED_WARNINGS = [
    r"W&B: no credentials found",  # how to log online, and the `wandb sync` command for this run
]


def tiny(run_dir, *extra: str):
    return compose(["recipe=cogvideox_lora", "preset=tiny", "logger=none", f"run_dir={run_dir}", "data.demo_count=4",
                    "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false", *extra])


def test_logger_none_trains_exports_and_resumes_with_the_bar_at_the_resumed_step(tmp_path, capsys):
    train(tiny(tmp_path, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2"))
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert re.search(r"step 2/2 \|", capsys.readouterr().err)
    resumed = train(tiny(tmp_path, "trainer.max_steps=3", "ckpt_path=last"))
    assert resumed.trainer.global_step == 3
    assert re.search(r"step 2/3 \|", capsys.readouterr().err)  # continues from the checkpoint's step


def test_without_ckpt_path_a_run_starts_fresh_next_to_a_checkpoint(tmp_path, capsys):
    """Lightning's OnExceptionCheckpoint would turn `ckpt_path=None` into `last` and resume silently."""
    train(tiny(tmp_path, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2"))
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    capsys.readouterr()
    train(tiny(tmp_path, "trainer.max_steps=3", "overwrite=true"))
    first_bar = re.search(r"step (\d+)/3 \|", capsys.readouterr().err)
    assert first_bar and first_bar.group(1) == "0"  # from step 0, not from the checkpoint's step 2


@pytest.mark.slow
def test_demo_console_shows_progress_and_results_and_no_known_warnings(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # the user's W&B default: offline
    env["NETRC"] = str(tmp_path / "no-netrc")  # without credentials, whatever this machine has
    result = subprocess.run(DEMO + [f"run_dir={tmp_path}"], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    console = result.stdout + result.stderr
    assert result.returncode == 0, console[-3000:]
    assert re.search(r"step 6/6 \|.*train/loss=\d", console), console[-3000:]
    for line in (r"validation samples for step 3: ", r"validation samples for step 6: ",
                 r"exported LoRA to .*pytorch_lora_weights\.safetensors",
                 rf"run directory: {re.escape(str(tmp_path.resolve()))}"):
        assert re.search(line, console), f"{line!r} not in the console:\n{console[-3000:]}"
    for known in KNOWN_WARNINGS:
        assert not re.search(known, console), f"{known!r} is back in the console:\n{console[-3000:]}"
    # Any other warning: a line naming one, or Python's `file.py:LINE: message` form (Lightning drops the category).
    lines = console.replace("\r", "\n").splitlines()
    warnings = [ln for ln in lines if re.search(r"warning|\.py:\d+: ", ln, re.I)]
    unexpected = [ln for ln in warnings if not any(re.search(a, ln) for a in ALLOWED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)
