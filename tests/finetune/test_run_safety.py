"""Run safety: no silent garbage, no silent overwrite, atomic writes, checkpoints that say what they are.

Each test takes the user's path (the composed tiny CogVideoX recipe through `finetune.run.train`) unless it
pins one piece (the checkpoint reader/writer, the export publisher)."""

from __future__ import annotations

import ast
import csv
import errno
import re

import lightning as L
import pytest
import torch
from conftest import REPO, compose

from finetune.checkpointing import CheckpointError, SafeCheckpointIO
from finetune.guards import TrainingFailed
from finetune.run import train


def tiny(run_dir, *extra: str):
    # log_every_n_steps=1: a CSV row per step (the resume test counts them); the default logs every 10 steps.
    return compose(["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}", "data.demo_count=4",
                    "callbacks.samples=null", "trainer.max_steps=4", "trainer.log_every_n_steps=1", *extra])


class PoisonStep(L.Callback):
    """Turns the batch of step 2 into NaNs, as a corrupt sample or an overflow would."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 2:
            batch["video" if "video" in batch else "latent_mean"].fill_(float("nan"))  # decoded, or from the cache


POISON = "+callbacks.poison._target_=test_run_safety.PoisonStep"


def test_a_non_finite_loss_stops_the_run_at_its_step_and_exports_nothing(tmp_path):
    with pytest.raises(TrainingFailed, match=r"non-finite \(NaN/inf\) at step 2, samples \[.+\]\. Nothing was exported"
                                             r".*last good checkpoint: .*checkpoints/last\.ckpt"):
        train(tiny(tmp_path, POISON, "callbacks.checkpoint.every_n_train_steps=2"))
    assert not (tmp_path / "export").exists()
    assert not (tmp_path / "checkpoints" / "on_exception.ckpt").exists()  # no checkpoint of the NaN weights
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2 and all(torch.isfinite(v).all() for v in saved["state_dict"].values())


def test_skip_policy_leaves_the_weights_of_a_bad_step_untouched(tmp_path):
    module = train(tiny(tmp_path, POISON, "callbacks.nonfinite.policy=skip", "trainer.max_steps=3",
                        "+callbacks.snapshot._target_=test_run_safety.Snapshot"))
    (guard,) = [c for c in module.trainer.callbacks if type(c).__name__ == "NonFiniteGuard"]
    (snapshot,) = [c for c in module.trainer.callbacks if isinstance(c, Snapshot)]
    assert guard.skipped == 1
    before, after = snapshot.weights[2], snapshot.weights[3]  # around the skipped step 2
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").exists()


class Snapshot(L.Callback):
    """The trainable weights before each step."""

    def __init__(self):
        self.weights: dict[int, dict] = {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.clone() for k, v in module.trainable_state_dict().items()}

    def on_train_end(self, trainer, module):
        self.weights[trainer.global_step] = {k: v.clone() for k, v in module.trainable_state_dict().items()}


def test_a_run_that_trains_nothing_fails(tmp_path):
    train(tiny(tmp_path, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2"))
    with pytest.raises(TrainingFailed, match="no batch was trained.*already reached max_steps"):
        train(tiny(tmp_path, "trainer.max_steps=2", "ckpt_path=last"))


class Interrupt(L.Callback):
    """Ctrl-C at step 1, as the terminal sends it."""

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_step == 1:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)


def test_an_interrupted_run_exits_non_zero_with_a_checkpoint(tmp_path):
    from finetune.run import train_command

    with pytest.raises(SystemExit) as exit_info:  # the step finishes, the checkpoint is written, exit 128 + SIGINT
        train_command(tiny(tmp_path, "+callbacks.interrupt._target_=test_run_safety.Interrupt"))
    assert exit_info.value.code == 130
    assert torch.load(tmp_path / "checkpoints" / "on_exception.ckpt", weights_only=True)["global_step"] == 2
    assert not (tmp_path / "export").exists()


def test_a_run_dir_is_reused_only_to_resume_or_when_asked(tmp_path, monkeypatch):
    train(tiny(tmp_path, "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2"))
    import finetune.run

    def no_model(cfg):
        raise AssertionError("the model was loaded")

    with monkeypatch.context() as patch:
        patch.setattr(finetune.run, "build_module", no_model)
        with pytest.raises(FileExistsError, match=r"already holds a run \(checkpoints, config.yaml, csv, export\)"
                                                  r".*ckpt_path=last.*overwrite=true"):
            train(tiny(tmp_path))
    first_config = (tmp_path / "config.yaml").read_text()
    train(tiny(tmp_path, "trainer.max_steps=4", "ckpt_path=last"))  # resume: logs append, config kept
    assert (tmp_path / "config.yaml").read_text() == first_config
    assert len(list(tmp_path.glob("config.resumed-*.yaml"))) == 1
    steps = [int(row["step"]) for row in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if row["train/loss"]]
    assert steps == [0, 1, 2, 3]  # the first run's rows and the resumed run's
    assert (tmp_path / "checkpoints" / "epoch=0-step=2.ckpt").exists()
    train(tiny(tmp_path, "trainer.max_steps=1", "overwrite=true"))  # a new run replaces the old outputs
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt"]
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 1


def test_checkpoint_writes_are_atomic_and_name_the_destination(tmp_path, monkeypatch):
    io = SafeCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, path)

    def disk_full(obj, f):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match=rf"could not write the checkpoint {re.escape(str(path))} \(No space left on "
                                      r"device\); the previous one is kept"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, path)
    monkeypatch.undo()
    assert torch.equal(io.load_checkpoint(path)["state_dict"]["w"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


class Payload:
    """A pickled object that would run code when unpickled without weights_only."""

    def __reduce__(self):
        return (print, ("code ran",))


def test_unreadable_and_unsafe_checkpoints_are_named(tmp_path):
    io = SafeCheckpointIO()
    truncated = tmp_path / "truncated.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(truncated))}: cannot be read as a checkpoint"):
        io.load_checkpoint(truncated)
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(empty))}: cannot be read"):
        io.load_checkpoint(empty)
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, unsafe)
    with pytest.raises(CheckpointError, match="holds objects other than weights.*weights_only=True"):
        io.load_checkpoint(unsafe)


def test_a_checkpoint_of_something_else_is_refused(tmp_path):
    train(tiny(tmp_path / "a", "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    with pytest.raises(CheckpointError, match=r"trained for something else: adapter: checkpoint .*'rank': 8"):
        train(tiny(tmp_path / "b", f"ckpt_path={ckpt}", "adapter.rank=4"))
    with pytest.raises(CheckpointError, match=r"recipe: checkpoint cogvideox_lora, this run cogview4_lora; model"):
        train(compose(["recipe=cogview4_lora", "preset=tiny", "logger=csv", f"run_dir={tmp_path / 'c'}",
                       f"ckpt_path={ckpt}", "callbacks.samples=null"]))


def test_a_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    module = train(tiny(tmp_path, "trainer.max_steps=1"))
    exported = tmp_path / "export" / "pytorch_lora_weights.safetensors"
    good = exported.read_bytes()
    (export,) = [c for c in module.trainer.callbacks if type(c).__name__ == "ExportAdapter"]

    def broken(directory, adapter, record=None):
        (directory / "pytorch_lora_weights.safetensors").write_bytes(b"half")
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(module.family, "export", broken)
    with pytest.raises(OSError, match=r"could not write the export .*export \(Disk quota exceeded\); the previous"):
        export.export(module.trainer, module, tmp_path / "export")
    assert exported.read_bytes() == good
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_no_unsafe_loading_in_the_kit():
    """Weights from users only through safetensors or `torch.load(weights_only=True)`; no remote code."""
    problems = []
    for package in ("finetune", "datamodules", "recipes", "bench"):
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if not isinstance(node, ast.Call):
                    continue
                name = ast.unparse(node.func)
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if name.endswith("torch.load") and keywords.get("weights_only") != "True":
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} torch.load without weights_only=True")
                if name.split(".")[-1] in ("load", "loads") and name.split(".")[0] in ("pickle", "dill"):
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} {name}")
                if keywords.get("trust_remote_code") not in (None, "False"):
                    problems.append(f"{path.relative_to(REPO)}:{node.lineno} trust_remote_code")
    assert not problems, problems


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path):
    from finetune.loggers import wandb_logger

    def closed(save_dir):  # each run starts in the background: wait for it and close it, as a finished run does,
        logger = wandb_logger(save_dir=str(save_dir), mode="offline")  # else a later logger joins the open one
        logger.experiment.finish()
        return logger

    first, again, other = closed(tmp_path), closed(tmp_path), closed(tmp_path / "other")
    assert first._wandb_init["id"] == again._wandb_init["id"] != other._wandb_init["id"]
    assert again._wandb_init["resume"] == "allow"


def _build_slowly(target):
    import time

    target.mkdir(parents=True)
    for i in range(5):
        (target / f"part{i}").write_text(str(i))
        time.sleep(0.05)
    (target / "done").write_text("ok")


def _build_in_process(target: str) -> None:
    from pathlib import Path

    from finetune.hub import build_atomically

    build_atomically(Path(target), _build_slowly)


def test_concurrent_builds_into_a_shared_cache_never_mix(tmp_path):
    """Two processes building the same cache entry at once (torchrun ranks, two runs on a fresh cache): each
    builds privately, one rename wins, the entry is whole and no partial folder is left."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    target = tmp_path / "tiny" / "model"
    workers = [context.Process(target=_build_in_process, args=(str(target),)) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
    assert sorted(p.name for p in target.iterdir()) == ["done", "part0", "part1", "part2", "part3", "part4"]
    assert [p.name for p in target.parent.iterdir()] == ["model"]


def test_the_atomic_helper_puts_a_file_or_folder_in_place_whole_or_leaves_nothing(tmp_path):
    """finetune.atomic.atomic_path, under the checkpoint, cache-entry, tiny-model and export writers: a private
    temporary name in the destination's folder, renamed over it on success, removed on any failure."""
    from finetune.atomic import atomic_path

    target = tmp_path / "entry.bin"
    target.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".entry.bin.tmp-")
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["entry.bin"]
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["entry.bin"]

    folder = tmp_path / "model"
    with pytest.raises(OSError):
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / "part0").write_text("0")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.bin"]
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        (tmp / "done").write_text("ok")
    assert [p.name for p in folder.iterdir()] == ["done"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry.bin", "model"]


def test_wandb_dryrun_in_the_environment_means_offline(tmp_path, monkeypatch):
    """Lightning's WandbLogger writes WANDB_MODE=dryrun (W&B's old name for offline) into the environment of an
    offline run: a later logger in the process, or a user with that setting, logs offline instead of failing."""
    from finetune.loggers import wandb_logger

    monkeypatch.setenv("WANDB_MODE", "dryrun")
    logger = wandb_logger(save_dir=str(tmp_path), mode="auto")
    logger.experiment.finish()
    assert logger._offline
