"""Training metrics on a cadence (finetune/loggers.py, FinetuneModule.log_train_loss) and W&B's background start."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from conftest import compose

from finetune.loggers import RunningMean, wandb_logger
from finetune.run import train


class StepLosses(L.Callback):
    """The loss `training_step` returned at each optimizer step."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"]))


def test_the_loss_is_logged_every_n_steps_as_the_mean_since_the_last_log(tmp_path):
    module = train(compose(["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={tmp_path}",
                            "data.demo_count=4", "callbacks.samples=null", "callbacks.export=null",
                            "trainer.max_steps=7", "trainer.log_every_n_steps=3",
                            "+callbacks.losses._target_=test_logging.StepLosses"]))
    (recorder,) = [c for c in module.trainer.callbacks if isinstance(c, StepLosses)]
    rows = [row for row in csv.DictReader(open(tmp_path / "csv" / "metrics.csv")) if row["train/loss"]]
    assert [int(row["step"]) for row in rows] == [2, 5, 6]  # every 3rd step, and the last
    windows = [recorder.losses[0:3], recorder.losses[3:6], recorder.losses[6:7]]
    torch.testing.assert_close(torch.tensor([float(row["train/loss"]) for row in rows]),
                               torch.tensor([sum(w) / len(w) for w in windows]))
    assert all(float(row["train/lr"]) > 0 for row in rows)  # the rate each logged step used, in the same row
    assert module.trainer.callback_metrics["train/loss"] == pytest.approx(recorder.losses[-1])


def test_running_mean_reads_the_device_once_per_window():
    mean = RunningMean()
    assert mean.pop() is None
    for value in (1.0, 2.0, 6.0):
        mean.add(torch.tensor(value, requires_grad=True) * 1)  # a loss: detached, not kept in the graph
    assert mean.pop() == pytest.approx(3.0) and mean.pop() is None


def test_wandb_starts_in_the_background_and_keeps_what_was_logged_meanwhile(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with caplog.at_level("INFO"):
        logger = wandb_logger(save_dir=str(tmp_path), mode="offline")
    assert "logging offline" in caplog.text  # a line, not a warning (finetune/loggers.py)
    assert logger.starting  # wandb.init runs in its thread; nothing here waited for it
    logger.log_hyperparams({"optimizer": {"lr": 0.5}})
    stand_in = logger.experiment  # what Lightning's setup touches: answered without waiting
    logger.log_metrics({"train/loss": 1.0}, step=3)  # queued for the starting thread (the baseline's metrics)
    run = logger.run()  # waits for the run
    try:
        assert not logger.starting and stand_in.id == run.id == logger.version
        assert run.config.as_dict()["optimizer"] == {"lr": 0.5}
        assert run.summary["train/loss"] == 1.0 and run.summary["trainer/global_step"] == 3  # by the starting thread
    finally:
        run.finish()


def test_a_fork_waits_for_the_background_wandb_start(tmp_path, monkeypatch):
    """A DataLoader worker forked while W&B starts (which launches git and its service) would inherit the launch's
    error pipe and hang the start for as long as the worker lives; a fork in this process waits for the start first.
    The stand-in start takes 0.5 s; the forked child sees it finished."""
    import multiprocessing
    import threading
    import time

    from lightning.pytorch.loggers import WandbLogger

    from finetune.loggers import BackgroundWandbLogger

    finished = threading.Event()

    def slow_start(self):
        time.sleep(0.5)
        finished.set()

    monkeypatch.setattr(WandbLogger, "experiment", property(slow_start))
    logger = BackgroundWandbLogger(save_dir=str(tmp_path), offline=True)
    logger.start()
    assert logger.starting and not finished.is_set()
    child = multiprocessing.get_context("fork").Process(target=_exit_with, args=(finished,))
    child.start()
    child.join(10)
    assert child.exitcode == 0  # 1: the fork happened while the start was still running
    logger._wait_for_start()


def _exit_with(finished) -> None:
    import os

    os._exit(0 if finished.is_set() else 1)


def test_work_after_the_wandb_start_runs_in_the_starting_thread_and_does_not_end_the_run(tmp_path, monkeypatch):
    """`after_start` (the data report and its contact sheet): while W&B starts, the caller does not wait; the work
    runs in the starting thread once the run is up; one that fails is a warning; once started, it runs at once."""
    import threading
    import time

    from lightning.pytorch.loggers import WandbLogger

    from finetune.loggers import BackgroundWandbLogger

    release, run = threading.Event(), object()

    def slow_start(self):
        release.wait(10)
        return run

    monkeypatch.setattr(WandbLogger, "experiment", property(slow_start))
    logger = BackgroundWandbLogger(save_dir=str(tmp_path), offline=True)
    logger.start()
    done: list = []

    def work(got):
        done.append((got, threading.current_thread().name))

    def broken(got):
        raise RuntimeError("no sheet")

    began = time.perf_counter()
    logger.after_start(work)
    logger.after_start(broken)
    assert time.perf_counter() - began < 0.5 and done == []  # queued: the start is still waiting
    release.set()
    with pytest.warns(UserWarning, match="broken failed .*no sheet"):
        logger._wait_for_start()
    assert done == [(run, "wandb-start")]
    logger.after_start(work)  # started: now, in this thread
    assert done[-1] == (run, threading.current_thread().name)
