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


# Messages every run or `cogft` command printed before they were removed at their source or filtered by exact text
# (finetune/console.py, finetune/loggers.py, README.md): none may come back.
QUIETED = [
    r"\.py:\d+: UserWarning: W&B",               # the kit's W&B note as a Python warning, with its source line echoed
    r"rank_zero_\w+\(f\"W&B",
    r"No module named 'kernels'",                 # bitsandbytes, imported by diffusers through peft
    r"GPU available: ", r"TPU available: ",       # Lightning's device inventory
    r"Checkpoint directory .* exists and is not empty",
    r"torch_dtype",                               # diffusers' deprecation of the README's old keyword
]


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
    assert re.search(r"^W&B: no credentials found .*wandb sync", console, re.M), console[-3000:]  # still said
    # a cogft command that loads the model (diffusers -> peft -> bitsandbytes) on the demo's checkpoint
    export = subprocess.run([sys.executable, "-m", "finetune.cogft", "export", str(tmp_path / "checkpoints" / "last.ckpt"),
                             "--out", str(tmp_path / "export_again")], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=300)
    cogft = export.stdout + export.stderr
    assert export.returncode == 0, cogft[-3000:]
    for name, text in (("train.py", console), ("cogft export", cogft)):
        for quieted in QUIETED:
            assert not re.search(quieted, text), f"{quieted!r} is back in {name}'s console:\n{text[-3000:]}"




def test_the_filters_drop_exactly_their_messages(caplog):
    """Machine-independent: bitsandbytes logs its line only on a CPU with AVX512-BF16, Lightning its device lines
    only from a Trainer."""
    import logging

    from finetune.console import BNB_KERNELS, BNB_LOGGER, quiet_known_warnings

    quiet_known_warnings()
    quiet_known_warnings()  # idempotent: one filter each
    bnb, rank_zero = logging.getLogger(BNB_LOGGER), logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert len(bnb.filters) == 1 and len(rank_zero.filters) == len(set(rank_zero.filters))
    for logger in (bnb, rank_zero):
        logger.addHandler(caplog.handler)
    try:
        bnb.warning("%s Please make sure you already `pip install kernels` and the kernels >= 0.11.1",
                    BNB_KERNELS[:-1] + ".")
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: some other error.")
        rank_zero.info("GPU available: False, used: False")
        rank_zero.info("TPU available: False, using: 0 TPU cores")
        rank_zero.info("GPU available but not used. You can set it by doing `Trainer(accelerator='gpu')`.")
    finally:
        for logger in (bnb, rank_zero):
            logger.removeHandler(caplog.handler)
    # (a record can reach caplog's handler twice: from the logger and, propagated, from the root)
    assert list(dict.fromkeys(r.getMessage() for r in caplog.records)) == [
        "Failed to load CPU gemm_4bit_forward from kernels-community: some other error.",
        "GPU available but not used. You can set it by doing `Trainer(accelerator='gpu')`."]
