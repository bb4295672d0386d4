"""A console that shows what the user can act on: the messages that every run prints and that nothing in a
config can change are silenced here, each by its exact text and origin, with the reason next to it.

What the kit could remove at its source is removed there instead (conf/callbacks/default.yaml: no
LearningRateMonitor; finetune/checkpointing.py: no implicit `ckpt_path="last"`; finetune/progress.py: the
step bar). Every other warning still shows.
"""

from __future__ import annotations

import logging
import warnings

from lightning.fabric.utilities.warnings import PossibleUserWarning

# (message regex, category, module that warns): Python's warnings filter matches the start of each.
KNOWN_WARNINGS = [
    # Diffusion recipes validate by sampling (callbacks.samples, limit_val_batches=0); the module's
    # validation_step serves the recipes that have a val split (CogVLM).
    (r"You defined a `validation_step` but have no `val_dataloader`", PossibleUserWarning,
     r"lightning\.pytorch\.trainer\.configuration_validator"),
    # The frozen parts (VAE, text encoder, base weights under LoRA) are put in eval mode on purpose: no
    # dropout in what is not trained.
    (r"Found \d+ module\(s\) in eval mode at the start of training", PossibleUserWarning,
     r"lightning\.pytorch\.loops\.fit_loop"),
    # The kit logs by optimizer step across epochs (finetune/loggers.py), so an epoch shorter than
    # trainer.log_every_n_steps loses no log line; Lightning assumes its per-epoch counting.
    (r"The number of training batches \(\d+\) is smaller than the logging interval", PossibleUserWarning,
     r"lightning\.pytorch\.loops\.fit_loop"),
    # torchdata's StatefulDataLoader (resumable data order) calls an API torch deprecated; fixed upstream.
    (r"'set_vital' is deprecated, please do not call", UserWarning,
     r"torchdata\.stateful_dataloader\.stateful_dataloader"),
    # Lightning's own pytree helper uses torch's deprecated `LeafSpec`; fixed upstream.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
]

# An advertisement Lightning logs on every run without its LitLogger; it says nothing about this run.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"


def quiet_known_warnings() -> None:
    """Silence the known messages above (idempotent: each filter is installed once)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_drop_litlogger_tip)


def _drop_litlogger_tip(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(LITLOGGER_TIP)

