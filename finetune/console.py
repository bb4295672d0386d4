"""A console that shows what the user can act on: the messages that every run prints and that nothing in a
config can change are silenced here, each by its exact text and origin, with the reason next to it.

What the kit could remove at its source is removed there instead (conf/callbacks/default.yaml: no
LearningRateMonitor; finetune/checkpointing.py: no implicit `ckpt_path="last"`; finetune/progress.py: the
step bar). Every other warning still shows.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import warnings
from typing import Callable

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
    # The kit decides whether a run directory may be reused before Lightning sees it (finetune/run.py,
    # docs/run-safety.md: a run directory with a run in it needs overwrite=true or ckpt_path): by the time
    # ModelCheckpoint finds files in checkpoints/, the user has asked for exactly that.
    (r"Checkpoint directory .* exists and is not empty\.", UserWarning, r"lightning\.pytorch"),
]

# An advertisement Lightning logs on every run without its LitLogger; it says nothing about this run.
LITLOGGER_TIP = "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"
# Lightning's device inventory (lightning/pytorch/trainer/setup.py, `_log_device_info`), logged on every run: the
# device a run uses is in its config (trainer.accelerator/devices) and its train.log; a GPU present but left unused
# still gets Lightning's own warning, which stays.
DEVICE_LINES = ("GPU available: ", "TPU available: ", "HPU available: ")
# bitsandbytes logs this when imported on a CPU with AVX512-BF16 (bitsandbytes/backends/cpu/ops.py), and diffusers
# imports it through peft on every model import: a faster CPU 4-bit matmul from the optional `kernels` package, which
# nothing in the kit runs (4-bit QLoRA needs CUDA: recipes/diffusion/pipeline.py).
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS = "Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'."


class DropLines(logging.Filter):
    """A logging filter that drops the records whose message starts with one of `prefixes`."""

    def __init__(self, *prefixes: str):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefixes)


# (logger, filter): the log lines above, each dropped where it is logged
LOG_FILTERS = [
    ("lightning.pytorch.utilities.rank_zero", DropLines(LITLOGGER_TIP, *DEVICE_LINES)),
    # the same logger object bitsandbytes' getLogger(__name__) returns, when it is imported later
    (BNB_LOGGER, DropLines(BNB_KERNELS)),
]


def quiet_known_warnings() -> None:
    """Silence the known messages above (idempotent: each filter is installed once)."""
    for message, category, module in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, drop in LOG_FILTERS:
        logger = logging.getLogger(name)
        if drop not in logger.filters:
            logger.addFilter(drop)



# -- user errors: one line, no traceback (finetune/errors.py) -------------------------------------------------------
TRACEBACK_ENV = "COGFT_TRACEBACK"  # set by `main` when the user asked for tracebacks (HYDRA_FULL_ERROR=1)


@contextlib.contextmanager
def user_errors(debug: bool = False):
    """A `finetune.errors.UserError` raised inside is printed as `error: <message>` and ends the process with status
    1; with `debug` (or HYDRA_FULL_ERROR=1 given by the user) it propagates with its traceback."""
    from finetune.errors import UserError

    try:
        yield
    except UserError as err:
        if debug or os.environ.get(TRACEBACK_ENV) == "1":
            raise
        sys.stderr.write(f"error: {err}\n")
        sys.stderr.flush()
        raise SystemExit(1) from None


def main(hydra_main: Callable[[], None], argv: list[str] | None = None) -> None:
    """Run a `@hydra.main` function so that a mistake on the command line reads as one line too: Hydra is told to
    raise its composition errors (HYDRA_FULL_ERROR), and an unknown key gets the kit's own hint, a setting of the
    composed config with a similar name, instead of Hydra's advice to add it with `+`. Other errors keep their
    traceback."""
    argv = sys.argv[1:] if argv is None else argv
    wants_traceback = os.environ.get("HYDRA_FULL_ERROR") == "1" or any(
        a.lstrip("+") in ("debug=true", "debug=True") for a in argv)
    os.environ[TRACEBACK_ENV] = "1" if wants_traceback else "0"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    from hydra.errors import ConfigCompositionException, OverrideParseException

    try:
        hydra_main()
    except (ConfigCompositionException, OverrideParseException) as err:
        if wants_traceback:
            raise
        sys.stderr.write(f"error: {composition_message(err, argv)}\n")
        raise SystemExit(1) from None


def composition_message(err: Exception, argv: list[str]) -> str:
    """Hydra's message, or for `Could not override 'a.b'` (no such key) the settings with a similar name."""
    import difflib
    import re

    text = str(err).strip()
    if err.__cause__ is not None and str(err.__cause__) not in text:
        text += f" ({str(err.__cause__).splitlines()[0]})"
    match = re.match(r"Could not override '([^']+)'", text)
    if not match:  # e.g. "Could not find 'strategy/fsdpp'" with the available options, one per line
        lines = [line.strip() for line in text.split("Config search path")[0].splitlines() if line.strip()]
        head, rest = lines[0], lines[1:]
        if rest and rest[0].endswith(":"):
            return f"{head}; {rest[0]} {', '.join(rest[1:])}"
        return "; ".join([head, *rest])
    key = match[1]
    given = next((a for a in argv if a.split("=", 1)[0].lstrip("~") == key), key)
    keys = composed_keys([a for a in argv if a is not given and not a.startswith(("-", "hydra."))])
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.75)
    parent = key.rpartition(".")[0]
    siblings = sorted(k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == parent)
    hint = (f"did you mean {' or '.join(close)}?" if close else
            f"{parent or 'the config'} has {', '.join(siblings[:12])}{' ...' if len(siblings) > 12 else ''}"
            if siblings else "no setting is near it")
    return (f"{given}: the config has no setting {key}; {hint} (`python train.py <same arguments> --cfg job` prints "
            f"every setting)")


def conf_dir():
    """The kit's configs: the folder of the installed `conf` package (package data of cog-finetune)."""
    from importlib.resources import files
    from pathlib import Path

    return Path(str(files("conf")))


def composed_keys(overrides: list[str]) -> list[str]:
    """Every leaf key of the config `train.py` composes with `overrides` (empty when that fails too)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    def leaves(node, prefix=""):
        for name, value in node.items():
            path = f"{prefix}{name}"
            yield from leaves(value, path + ".") if isinstance(value, dict) else [path]

    try:
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose(config_name="train", overrides=overrides)
        return list(leaves(OmegaConf.to_container(cfg, resolve=False)))
    except Exception:  # the other overrides are broken as well: no hint rather than a second error
        return []
