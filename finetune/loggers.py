"""Experiment loggers. W&B never prompts: without credentials it logs offline and says how to sync."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger
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
    logger = WandbLogger(save_dir=save_dir, project=project, name=name, offline=(mode == "offline"),
                         mode=mode if mode == "disabled" else None, **kwargs)
    # Lightning always passes `anonymous=` to `wandb.init`, which wandb>=0.19 answers with a deprecation notice
    # on every run; the kit never logs anonymously.
    logger._wandb_init.pop("anonymous", None)
    return logger
