"""Build the objects a composed config names and connect them. No model-specific code here."""

from __future__ import annotations

import inspect
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import get_class, instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from finetune import hub, runs
from finetune.checkpointing import RunInterrupted, run_identity
from finetune.console import quiet_known_warnings
from finetune.data_report import SHEET_LIMIT, check_long_captions, contact_sheet, data_report, log_report, report_rows
from finetune.errors import PathSettingError, RunDirError
from finetune.hub import check_weight_files
from finetune.lora_formats.record import check_lora_fits
from finetune.loop import quiet_profiler
from finetune.module import FinetuneModule
from finetune.settings.check import ConfigError, check_choices, check_config, check_trainable_modules


# `ckpt_path` names: a file in run_dir/checkpoints, or (`auto`) the newest checkpoint there if any.
CHECKPOINT_NAMES = {"last": "last.ckpt", "on_exception": "on_exception.ckpt"}


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """The checkpoint a run resumes from: `last`, `on_exception` (in run_dir/checkpoints), `auto` (the newest
    complete checkpoint of run_dir, or None for a fresh start: what a requeued job passes), or a path."""
    if ckpt_path in (None, ""):
        return None
    if ckpt_path == "auto":
        newest = runs.checkpoints_of(run_dir)
        return str(newest[0]) if newest else None
    named = ckpt_path in CHECKPOINT_NAMES
    path = run_dir / "checkpoints" / CHECKPOINT_NAMES[ckpt_path] if named else Path(ckpt_path)
    if not path.exists():  # a file, or a folder (deepspeed, fsdp2 with save_distributed_checkpoint=true)
        hint = (f"pass run_dir=<the interrupted run's directory> with ckpt_path={ckpt_path}, or ckpt_path=auto to "
                f"resume from its newest checkpoint (or start afresh if it has none)"
                if named else "check the path")
        raise PathSettingError(f"ckpt_path={ckpt_path!r}: {path} does not exist; {hint}.")
    return str(path)


# -- the model family: its checkpoint resolved once, handed to everything that reads it ----------------------------

def model_settings(model_cfg: DictConfig) -> tuple[type, dict]:
    """The family class `model._target_` names and the other model settings, resolved."""
    settings = OmegaConf.to_container(model_cfg, resolve=True)
    return get_class(settings.pop("_target_")), settings


def taking(method, settings: dict):
    """`method` called with the settings its signature names: a family's classmethods take the settings they use."""
    parameters = inspect.signature(method).parameters
    if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        return method(**settings)
    return method(**{k: v for k, v in settings.items() if k in parameters})


def resolve_checkpoint(model_cfg: DictConfig, weights: bool = True) -> str | None:
    """The local folder of `model.path` (a hub id downloaded, `tiny` built once into the kit cache, a folder checked),
    through the family's `local_checkpoint`; None for a family without one. A run resolves it once (`build`) and
    hands it to `data_processor`, `trainable_module_names` and the constructor as `checkpoint`; the config keeps
    the user's `model.path`. `weights=False` (what `build` asks): a hub id fetches only its configs, tokenizers and
    index files (`finetune.hub.CHECK_FILES`), enough for the checks; `fetch_weights` then downloads the rest."""
    family, settings = model_settings(model_cfg)
    folder = taking(family.local_checkpoint, {**settings, "weights": weights})
    return fetch_weights(model_cfg, folder) if weights else folder


def fetch_weights(model_cfg: DictConfig, folder: str | None) -> str | None:
    """The weights of `folder` (`resolve_checkpoint`): a hub checkpoint fetched without them downloads the rest into
    the same folder (`finetune.hub.fetch_weights`; a local folder or `tiny`: nothing); then a truncated weight file
    stops the run here, named, before any weight loads."""
    if folder is not None:
        setting = f"model.path={model_settings(model_cfg)[1].get('path')!r}"
        hub.fetch_weights(folder)
        check_weight_files(folder, setting)
    return folder


def _with_checkpoint(model_cfg: DictConfig, checkpoint: str | None) -> tuple[type, dict]:
    family, settings = model_settings(model_cfg)
    if checkpoint is None:
        checkpoint = resolve_checkpoint(model_cfg)
    return family, {**settings, "checkpoint": checkpoint}


def family_data_processor(model_cfg: DictConfig, checkpoint: str | None = None):
    """The family's description of its data, from the model settings, before any weights load."""
    family, settings = _with_checkpoint(model_cfg, checkpoint)
    return taking(family.data_processor, settings)


def trainable_module_names(model_cfg: DictConfig, checkpoint: str | None = None) -> dict[str, str] | None:
    """Qualified name -> class name of every module of the family's trainable network, on a weightless copy
    (None: a family that cannot tell before its weights load)."""
    family, settings = _with_checkpoint(model_cfg, checkpoint)
    return taking(family.trainable_module_names, settings)


def build_family(cfg: DictConfig, checkpoint: str | None = None):
    """The model family a composed config names (the model loads here), from `checkpoint` (None: `model.path`
    resolved here)."""
    if checkpoint is None:
        checkpoint = resolve_checkpoint(cfg.model)
    return instantiate(cfg.model, **({"checkpoint": checkpoint} if checkpoint is not None else {}))


def build_module(cfg: DictConfig, checkpoint: str | None = None) -> FinetuneModule:
    """The LightningModule a config names: its family (the model is loaded here), adapter, optimizer."""
    return FinetuneModule(family=build_family(cfg, checkpoint), adapter=instantiate(cfg.adapter),
                          optimizer=instantiate(cfg.optimizer), lr_scheduler=instantiate(cfg.lr_scheduler),
                          seed=cfg.get("seed"), **cfg.module)


def build_data(cfg: DictConfig, checkpoint: str | None = None):
    """The data module connected to the family's processor and checked: bad data and settings the model cannot
    take fail here, before the (expensive) model is loaded."""
    datamodule = instantiate(cfg.data)
    datamodule.connect(family_data_processor(cfg.model, checkpoint))
    datamodule.check()
    # what the run trains on, on the console (and to W&B, `log_data_report`); long captions per
    # data.on_long_caption (finetune/data_report.py)
    datamodule.report = data_report(datamodule)
    if datamodule.report is not None:
        rank_zero_info(datamodule.report.text())
        check_long_captions(datamodule.report)
    return datamodule


def log_data_report(trainer: L.Trainer, datamodule, run_dir: Path) -> None:
    """The data report and a contact sheet of the first `SHEET_LIMIT` samples (`run_dir/data_sheet.png`) to W&B
    (`data/report`, `data/sheet`), on rank zero, when the run logs to W&B."""
    report = getattr(datamodule, "report", None)
    if report is None or trainer.global_rank != 0 or \
            not any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
        return
    # drawn here, not in W&B's starting thread: no video decoding in a second thread of a process that forks loader
    # workers
    sheet = contact_sheet(report_rows(datamodule), run_dir / "data_sheet.png", limit=SHEET_LIMIT)
    log_report(trainer.loggers, report, sheet)


def build(cfg: DictConfig, checked: bool = False) -> tuple[L.Trainer, FinetuneModule, L.LightningDataModule,
                                                            str | None]:
    """The trainer, module and data of a config, after `check_config` (`checked`: the caller ran it, as `train`)."""
    if not checked:
        check_config(cfg)  # every setting's type, range and name, before anything is read or built
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    if cfg.get("adapter_path"):
        if ckpt_path:
            raise ConfigError("pass ckpt_path or adapter_path, not both: a checkpoint already holds the adapter")
        runs.check_adapter_path(cfg.adapter_path)  # before anything loads: a missing export, a failed run's folder
    L.seed_everything(cfg.seed, workers=True)
    # the one place model.path is resolved (built; a hub id: its configs and tokenizers, no weights yet)
    checkpoint = resolve_checkpoint(cfg.model, weights=False)
    datamodule = build_data(cfg, checkpoint)
    # LoRA targets and trained modules by name, on a weightless copy of the network
    check_trainable_modules(cfg, trainable_module_names(cfg.model, checkpoint))
    fetch_weights(cfg.model, checkpoint)  # every check passed: a hub id's weights download now, each file checked
    module = build_module(cfg, checkpoint)
    if cfg.get("adapter_path"):  # an export (family.export) as the weights, e.g. with mode=test
        check_lora_fits(cfg.adapter_path, module.family, cfg.get("adapter_force", False), "adapter_force=true")
        module.family.load_adapter(cfg.adapter_path, module.adapter)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    logger = instantiate(cfg.logger) if cfg.logger else False  # conf/logger/none.yaml: no logger
    # conf/strategy/auto.yaml names a Lightning strategy (`name: auto`) instead of building one
    strategy = instantiate(cfg.strategy) if "_target_" in cfg.strategy else cfg.strategy.name
    # trainer.profiler null: Lightning's pass-through profiler without its per-hook context managers (finetune/loop.py)
    profiler = {} if cfg.trainer.get("profiler") else {"profiler": quiet_profiler()}
    trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), strategy=strategy,
                          callbacks=callbacks, logger=logger, **profiler)
    module.identity = run_identity(cfg)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    log_data_report(trainer, datamodule, run_dir)
    return trainer, module, datamodule, ckpt_path


# What a run writes into its run_dir (Hydra's own train.log is appended to and not counted).
RUN_OUTPUTS = ("config.yaml", "data_sheet.png", "checkpoints", "export", "samples", "predictions", "csv", "tensorboard",
               "wandb")


def claim_run_dir(run_dir: Path, ckpt_path: str | None, overwrite: bool) -> list[str]:
    """Each run owns its directory: one that holds another run's outputs is reused only to resume it
    (`ckpt_path`) or when asked (`overwrite=true`, which removes those outputs first). Returns what was there."""
    found = sorted(name for name in RUN_OUTPUTS if (run_dir / name).exists())
    if found and not ckpt_path and not overwrite:
        raise RunDirError(
            f"run_dir={run_dir} already holds a run ({', '.join(found)}). Resume it with ckpt_path=last, choose "
            f"another run_dir (the default is a new timestamped folder), or pass overwrite=true to replace it.")
    if found and overwrite and not ckpt_path:
        for name in found:
            path = run_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        return []
    return found


def train(cfg: DictConfig) -> FinetuneModule:
    """`mode=fit` trains (resuming from `ckpt_path`); `mode=test` evaluates the test split with the
    weights of `ckpt_path`, of an exported adapter (`adapter_path`), or of the base model, and logs `test/*`.
    The run's status.json says how it ended (`finetune.runs`); a finished run becomes the `latest` link."""
    quiet_known_warnings()  # before anything warns: the console keeps only what the user can act on
    if HydraConfig.initialized():  # train.py: a preset or other group choice that composed nothing stops it too
        check_choices(HydraConfig.get())
    check_config(cfg)  # a bad setting stops the run before anything is read, built or removed (overwrite=true)
    run_dir = Path(cfg.run_dir)
    first_process = int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0
    # Processes that Lightning or torchrun starts for the other ranks find the folder rank zero just claimed.
    earlier = claim_run_dir(run_dir, cfg.get("ckpt_path"), bool(cfg.get("overwrite", False))) if first_process else []
    mode = cfg.get("mode", "fit")
    if first_process:
        runs.started(run_dir, str(cfg.name), mode, cfg.trainer.get("max_steps"), task_overrides())
    trainer = None
    try:
        trainer, module, datamodule, ckpt_path = build(cfg, checked=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        if first_process:  # a resumed run keeps the first config and adds its own next to it
            resumed = "config.yaml" in earlier
            name = f"config.resumed-{time.strftime('%Y%m%d-%H%M%S')}.yaml" if resumed else "config.yaml"
            (run_dir / name).write_text(OmegaConf.to_yaml(cfg, resolve=True))
        sigint = signal.getsignal(signal.SIGINT)  # Lightning ignores Ctrl-C from its own shutdown on, for good
        try:
            if mode == "test":
                trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
            else:
                trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        finally:
            finish_loggers(trainer)
            if threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGINT, sigint)
    except BaseException as err:
        if first_process:
            record_ending(cfg, run_dir, trainer, err)
        raise
    if first_process:
        record_ending(cfg, run_dir, trainer, None)
    rank_zero_info(f"run directory: {run_dir.resolve()}")
    return module


def record_ending(cfg: DictConfig, run_dir: Path, trainer: L.Trainer | None, err: BaseException | None) -> None:
    """status.json after the run (finished, failed, interrupted) with the command that resumes an unfinished one;
    a finished training run becomes `cfg.latest_link`."""
    step = trainer.global_step if trainer is not None else None
    fields = {"step": step, "ended": runs.now(), "exports": runs.exports_of(run_dir)}
    if err is None:
        runs.write_status(run_dir, status="finished", error=None, resume=None, **fields)
        if cfg.get("mode", "fit") == "fit" and cfg.get("latest_link"):
            runs.link_latest(Path(cfg.latest_link), run_dir)
        return
    interrupted = isinstance(err, (RunInterrupted, KeyboardInterrupt, SystemExit))
    resume = None
    if cfg.get("mode", "fit") == "fit":
        if isinstance(err, RunInterrupted) and err.checkpoint:
            resume = runs.resume_command(run_dir, "on_exception", task_overrides())
        elif runs.checkpoints_of(run_dir):  # a crash's checkpoint, or a second Ctrl-C: the newest one there
            resume = runs.resume_command(run_dir, "auto", task_overrides())
    message = str(err) if not isinstance(err, SystemExit) else "stopped at once (a second signal): no new checkpoint"
    runs.write_status(run_dir, status="interrupted" if interrupted else "failed",
                      error=f"{type(err).__name__}: {message}", resume=resume, **fields)
    err.resume = resume  # shown by train_command


def task_overrides() -> list[str]:
    """The command line's settings (Hydra's task overrides), for the resume command; none outside Hydra."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def train_command(cfg: DictConfig) -> None:
    """The job of `python train.py` and `cogft train`: `train`, a user's mistake told as one line
    (`finetune.console.user_errors`; `debug=true` shows its traceback); an interrupted run ends with the command that
    resumes it and the signal's exit status."""
    from finetune.console import user_errors

    try:
        with user_errors(debug=bool(cfg.get("debug", False))):
            train(cfg)
    except (RunInterrupted, SystemExit) as err:
        if not hasattr(err, "resume"):  # not the end of a run (`user_errors` has told the mistake already)
            raise
        stopped = str(err) if isinstance(err, RunInterrupted) else "the run stopped at once, with no new checkpoint"
        sys.stderr.write(f"{stopped}.\n" + (f"resume with:\n  {err.resume}\n" if err.resume else
                                            "no checkpoint to resume from: start the run again.\n"))
        sys.stderr.flush()
        raise SystemExit(err.exit_code if isinstance(err, RunInterrupted) else err.code) from None


def finish_loggers(trainer: L.Trainer) -> None:
    """Close the W&B run (also after a crash), so its files are complete for `wandb sync` and a later
    run in the same process starts a new run instead of appending to this one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and (logger._experiment is not None or getattr(logger, "starting", False)):
            logger.experiment.finish()  # a run still starting in the background (finetune/loggers.py) is waited for
