"""A user's mistake reads as one line, `error: <what, where, the fix>`, exit status 1 and no traceback
(finetune/errors.py, finetune/console.py); `debug=true` shows the traceback. Damaged weight files are named before
anything loads (finetune/hub.py `check_weight_files`)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, compose

from finetune.errors import ModelPathError, UserError


def train_py(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    environment.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**environment, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, *parts: str) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "Error executing job" not in result.stderr, result.stderr[-2000:]
    for part in parts:
        assert part in errors[0], errors[0]
    return errors[0]


def test_an_unknown_key_gets_the_kits_hint_not_hydras(tmp_path):
    result = train_py("recipe=cogvideox_lora", "preset=tiny", "trainer.max_step=10", f"run_dir={tmp_path}")
    line = assert_one_line_error(result, "trainer.max_step=10", "did you mean trainer.max_steps")
    assert "+trainer.max_step" not in result.stderr, line  # Hydra's advice would add a key nothing reads


def test_a_bad_group_choice_lists_the_options(tmp_path):
    result = train_py("recipe=cogvideox_lora", "strategy=fsdpp", f"run_dir={tmp_path}")
    assert_one_line_error(result, "strategy/fsdpp", "fsdp2", "deepspeed_zero2")


def test_a_data_error_is_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ("recipe=cogvideox_lora", "preset=tiny", "logger=csv", "data.root=/no/such/folder", f"run_dir={tmp_path}")
    assert_one_line_error(train_py(*args), "data.root='/no/such/folder'", "data.root=demo")
    debug = train_py(*args, "debug=true")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "DataError" in debug.stderr
    full = train_py(*args, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode != 0 and "Traceback" in full.stderr


def test_every_kit_error_type_is_a_user_error():
    from finetune.checkpointing import CheckpointError
    from finetune.data import DataError
    from finetune.guards import TrainingFailed
    from finetune.lora_formats.files import LoraFileError
    from finetune.settings.check import ConfigError

    for error in (CheckpointError, DataError, TrainingFailed, LoraFileError, ConfigError, ModelPathError):
        assert issubclass(error, UserError), error
    assert issubclass(ConfigError, ValueError) and issubclass(ModelPathError, FileNotFoundError)  # as before


def test_a_truncated_weight_file_is_named_before_anything_loads(tiny_cogvideox, tmp_path, monkeypatch):
    from finetune import run

    damaged = tmp_path / "model"
    shutil.copytree(tiny_cogvideox, damaged)
    weights = damaged / "transformer" / "diffusion_pytorch_model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as f:
        f.truncate(size - 100)
    cfg = compose(["recipe=cogvideox_lora", "preset=tiny", f"model.path={damaged}", f"run_dir={tmp_path / 'run'}",
                   "logger=csv"])
    loaded = []
    monkeypatch.setattr(run, "build_family", lambda *a, **k: loaded.append(a))  # nothing may get this far
    with pytest.raises(ModelPathError) as caught:
        run.train(cfg)
    message = str(caught.value)
    assert str(weights) in message and f"{size - 100} bytes" in message and "again" in message and not loaded
    for garbage in (b"", b"\x10\x00", (1 << 40).to_bytes(8, "little") + b"{}"):
        weights.write_bytes(garbage)
        with pytest.raises(ModelPathError, match="diffusion_pytorch_model.safetensors is damaged"):
            run.resolve_checkpoint(cfg.model)
