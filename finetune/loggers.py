"""Experiment loggers. W&B never prompts: without credentials it logs offline and says how to sync."""

from __future__ import annotations

import netrc
import os
import secrets
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_warn


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
    if mode == "auto":
        mode = os.environ.get("WANDB_MODE") or ("online" if wandb_credentials_present() else "offline")
    if mode not in ("online", "offline", "disabled"):
        raise ValueError(f"logger.mode={mode!r}: use auto, online, offline or disabled")
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode == "offline":
        rank_zero_warn(f"W&B: no credentials found (WANDB_API_KEY or `wandb login`), logging offline under "
                       f"{save_dir}/wandb. Upload later with: wandb sync {save_dir}/wandb/offline-run-*")
    kwargs.setdefault("id", run_id(Path(save_dir)))
    logger = WandbLogger(save_dir=save_dir, project=project, name=name, offline=(mode == "offline"),
                         mode=mode if mode == "disabled" else None, resume="allow", **kwargs)
    # Lightning always passes `anonymous=` to `wandb.init`, which wandb>=0.19 answers with a deprecation notice
    # on every run; the kit never logs anonymously.
    logger._wandb_init.pop("anonymous", None)
    return logger


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
