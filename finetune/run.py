"""Build the objects a composed config names and connect them. No model-specific code here."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from omegaconf import DictConfig, OmegaConf

from finetune.module import FinetuneModule


def named_strategy(name: str = "auto") -> str:
    """Lightning's strategies by name (`auto`, `ddp_spawn`, ...), for configs without a class."""
    return name


def no_logger() -> bool:
    return False


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    if ckpt_path in (None, ""):
        return None
    path = run_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        hint = ("pass run_dir=<the interrupted run's directory> with ckpt_path=last"
                if ckpt_path == "last" else "check the path")
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r}: {path} does not exist; {hint}.")
    return str(path)


def build_module(cfg: DictConfig) -> FinetuneModule:
    """The LightningModule a config names: its family (the model is loaded here), adapter, optimizer."""
    return FinetuneModule(family=instantiate(cfg.model), adapter=instantiate(cfg.adapter),
                          optimizer=instantiate(cfg.optimizer), lr_scheduler=instantiate(cfg.lr_scheduler),
                          **cfg.module)


def build(cfg: DictConfig) -> tuple[L.Trainer, FinetuneModule, L.LightningDataModule, str | None]:
    run_dir = Path(cfg.run_dir)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.check()  # bad data fails here, before the (expensive) model is loaded
    module = build_module(cfg)
    if cfg.get("adapter_path"):  # an exported adapter (family.save_lora) as the weights, e.g. with mode=test
        if ckpt_path:
            raise ValueError("pass ckpt_path or adapter_path, not both: a checkpoint already holds the adapter")
        module.family.load_adapter(cfg.adapter_path, adapter_name=getattr(module.adapter, "adapter_name", "default"))
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    logger = instantiate(cfg.logger)
    trainer = instantiate(cfg.trainer, default_root_dir=str(run_dir), strategy=instantiate(cfg.strategy),
                          callbacks=callbacks, logger=logger)
    for lg in trainer.loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return trainer, module, datamodule, ckpt_path


def train(cfg: DictConfig) -> FinetuneModule:
    """`mode=fit` trains (resuming from `ckpt_path`); `mode=test` evaluates the test split with the
    weights of `ckpt_path`, of an exported adapter (`adapter_path`), or of the base model, and logs `test/*`."""
    if cfg.get("mode", "fit") not in ("fit", "test"):
        raise ValueError(f"mode={cfg.mode!r}: use fit or test")
    trainer, module, datamodule, ckpt_path = build(cfg)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    try:
        if cfg.get("mode", "fit") == "test":
            trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path)
        else:
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        finish_loggers(trainer)
    rank_zero_info(f"run directory: {run_dir.resolve()}")
    return module


def finish_loggers(trainer: L.Trainer) -> None:
    """Close the W&B run (also after a crash), so its files are complete for `wandb sync` and a later
    run in the same process starts a new run instead of appending to this one."""
    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
