"""Experiment loggers, and the training metrics' cadence.

W&B never prompts: without credentials it logs offline and says how to sync. Training metrics (`train/loss`,
`train/lr`) reach the loggers every `trainer.log_every_n_steps` optimizer steps and at the last one
(`is_logging_step`), read from the device once per cadence (`RunningMean`): a step never waits for the accelerator
to report a number nobody reads yet.
"""

from __future__ import annotations

import netrc
import os
import secrets
import threading
from pathlib import Path

import torch
from lightning.fabric.utilities.logger import _convert_json_serializable, _convert_params, _sanitize_callable_params
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only


def wandb_credentials_present() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        hosts = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc")).hosts
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def wandb_logger(save_dir: str, project: str = "cog-finetune", name: str | None = None,
                 mode: str = "auto", **kwargs) -> WandbLogger:
    """`mode`: `online`, `offline`, or `auto` (online only when credentials are configured; also
    respects `WANDB_MODE`)."""
    why = f"logger.mode={mode}"
    if mode == "auto":
        env = os.environ.get("WANDB_MODE")
        why = f"WANDB_MODE={env}" if env else "no credentials found (WANDB_API_KEY or `wandb login`)"
        mode = env or ("online" if wandb_credentials_present() else "offline")
        # W&B's older name for offline, which Lightning's WandbLogger itself writes into WANDB_MODE for an offline run
        mode = "offline" if mode == "dryrun" else mode
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode={mode!r}: use auto, online, offline or disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode == "offline":
        # a plain line (Lightning's rank-zero logger), not a warning: Python would echo this source line under it
        rank_zero_info(f"W&B: {why}, logging offline under {save_dir}/wandb. Upload later with: wandb sync "
                       f"{save_dir}/wandb/offline-run-*")
    kwargs.setdefault("id", run_id(Path(save_dir)))
    logger = BackgroundWandbLogger(save_dir=save_dir, project=project, name=name, offline=(mode == "offline"),
                                   mode=mode if mode == "disabled" else None, resume="allow", **kwargs)
    # Lightning always passes `anonymous=` to `wandb.init`, which wandb>=0.19 answers with a deprecation notice
    # on every run; the kit never logs anonymously.
    logger._wandb_init.pop("anonymous", None)
    logger.start()
    return logger


_STARTING: set[threading.Thread] = set()  # background W&B starts under way in this process


def _finish_starts_before_fork() -> None:
    """Before this process forks (DataLoader workers, `multiprocessing`), let any W&B start finish. The start runs
    subprocesses (git, W&B's service); a fork while one is being launched copies the launch's error pipe into the
    child, which never execs, so the launching thread waits for that pipe to close as long as the child lives, and a
    DataLoader worker lives until the main thread, itself waiting for the start, lets it go: a hang."""
    for starter in list(_STARTING):
        if starter.is_alive() and starter is not threading.current_thread():
            starter.join()


os.register_at_fork(before=_finish_starts_before_fork)


class BackgroundWandbLogger(WandbLogger):
    """Lightning's `WandbLogger`, its run started in a background thread by `start()`: W&B's start (its service
    process and its imports, ~1.3 s on a 2-core machine, longer online) then overlaps the trainer's setup and the
    first steps instead of delaying them. Hyperparameters logged meanwhile are applied once the run is up; whatever
    needs the run itself (`experiment`: metrics, samples, `finish`) waits for the start, and a failed start raises
    there. A fork in this process (a DataLoader worker) waits for the start to finish (`_finish_starts_before_fork`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._starter: threading.Thread | None = None
        self._start_error: BaseException | None = None
        self._pending: dict | None = None  # hyperparameters logged while the run starts
        self._deferred: list = []  # `after_start` work waiting for the run
        self._lock = threading.Lock()

    @property
    def starting(self) -> bool:
        """A background start was begun and not yet waited for (its run may exist without `_experiment` set yet)."""
        return self._starter is not None

    def start(self) -> None:
        if rank_zero_only.rank != 0 or self._experiment is not None or self._starter is not None:
            return
        self._pending = {}
        self._starter = threading.Thread(target=self._start, name="wandb-start", daemon=True)
        _STARTING.add(self._starter)
        self._starter.start()

    def _start(self) -> None:
        try:
            run = WandbLogger.experiment.fget(self)
            with self._lock:
                params, self._pending = self._pending, None
                deferred, self._deferred = self._deferred, []
            if params:
                run.config.update(params, allow_val_change=True)
            for work in deferred:
                _run_logging_work(work, run)
        except BaseException as err:  # raised where the run is first needed
            self._start_error = err
        finally:
            _STARTING.discard(threading.current_thread())

    def _wait_for_start(self) -> None:
        starter = self._starter
        if starter is None or starter is threading.current_thread():
            return
        starter.join()
        self._starter, self._pending = None, None
        if self._start_error is not None:
            error, self._start_error = self._start_error, None
            raise error

    @property
    def experiment(self):
        starter = self._starter
        if starter is not None and starter.is_alive() and starter is not threading.current_thread():
            # Lightning touches `experiment` in its setup only to have the run created: a stand-in answers, and its
            # first real use waits for the run.
            return _StartingRun(self)
        return self.run()

    def run(self):
        """The W&B run (a `DummyExperiment` on ranks other than zero), once started."""
        self._wait_for_start()
        return WandbLogger.experiment.fget(self)

    def after_start(self, work) -> None:
        """`work(run)` once the W&B run is up: in the starting thread while it starts (the caller goes on at once),
        else now. What it logs is not needed by the run itself (the data report, its contact sheet); an error in it
        is a warning, not the run's end."""
        with self._lock:
            if self._pending is not None:
                self._deferred.append(work)
                return
        _run_logging_work(work, self.run())

    @rank_zero_only
    def log_metrics(self, metrics, step=None) -> None:
        """While the run starts, the metrics wait for it in the starting thread (the validation baseline's, logged
        before step 1, would otherwise hold the first step for W&B's start); later ones come after them in order."""
        with self._lock:
            if self._pending is not None:
                metrics = dict(metrics)
                self._deferred.append(lambda run: WandbLogger.log_metrics(self, metrics, step))
                return
        super().log_metrics(metrics, step)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        params = _convert_json_serializable(_sanitize_callable_params(_convert_params(params)))
        with self._lock:
            if self._pending is not None:  # the run is starting: applied by the starting thread
                self._pending.update(params)
                return
        self.run().config.update(params, allow_val_change=True)

    def __getstate__(self) -> dict:
        self._wait_for_start()
        state = super().__getstate__()  # Lightning's spawn launcher re-attaches to the run
        state.update(_starter=None, _start_error=None, _pending=None, _deferred=[], _lock=None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def run_id(save_dir: Path) -> str:
    """The W&B run of this run_dir: made once and kept in `wandb/cogft_run_id`, so a resumed run (same run_dir)
    logs into the same W&B run instead of starting another."""
    path = save_dir / "wandb" / "cogft_run_id"
    if path.is_file():
        return path.read_text().strip()
    identifier = secrets.token_hex(4)  # W&B's own ids are 8 lowercase characters too
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(identifier)
    return identifier


class AppendingExperimentWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run appends to it."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                header = file.readline().strip()
            self.metrics_keys = sorted(header.split(",")) if header else []


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment


def csv_logger(save_dir: str, name: str = "csv", version: str = "") -> CSVLogger:
    """`run_dir/csv/metrics.csv`; a resumed run (same run_dir) appends its rows."""
    return AppendingCSVLogger(save_dir=save_dir, name=name, version=version)


def is_logging_step(trainer, step: int) -> bool:
    """Whether optimizer step `step` (0-based: `trainer.global_step` before it is taken) logs: every
    `trainer.log_every_n_steps` steps (Lightning's own rule: steps N-1, 2N-1, ...), the last step of `max_steps`, and
    a step after which the trainer stops."""
    every = trainer.log_every_n_steps
    if not every:
        return False
    return (step + 1) % every == 0 or step + 1 == trainer.max_steps or trainer.should_stop


def log_metrics(trainer, metrics: dict[str, float], step: int) -> None:
    """To every logger of the run, as Lightning logs what `self.log` collected (with the epoch, then `save`)."""
    for logger in trainer.loggers:
        logger.log_metrics({**metrics, "epoch": trainer.current_epoch}, step=step)
        logger.save()


class RunningMean:
    """The mean of the values added since the last `pop`, kept on their device: `add` queues one addition and never
    waits for the accelerator; `pop` reads the mean (the one host-device sync) and starts a new window."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def add(self, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.total = value if self.total is None else self.total + value
        self.count += 1

    def pop(self) -> float | None:
        if not self.count:
            return None
        mean = float(self.total) / self.count
        self.total, self.count = None, 0
        return mean


def _run_logging_work(work, run) -> None:
    try:
        work(run)
    except Exception as err:  # noqa: BLE001 - logging extras never end a run
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"W&B: {getattr(work, '__name__', 'logging')} failed ({type(err).__name__}: {err}); the run "
                       f"goes on without it.")


class _StartingRun:
    """Stands for a W&B run that is still starting: any attribute waits for the run and comes from it."""

    def __init__(self, logger: BackgroundWandbLogger):
        self._logger = logger

    def __getattr__(self, name: str):
        return getattr(self._logger.run(), name)
