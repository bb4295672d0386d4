"""The console progress bar: one bar over optimizer steps, `step N/max_steps` with the loss.

Lightning's default bars count batches per epoch; the kit trains by steps (`max_epochs: -1`), so they read
`Epoch 4/-2` and restart every pass over the data. Steps are what `trainer.max_steps`, checkpoints, samples
and exports are counted in.
"""

from __future__ import annotations

import contextlib
import logging
import sys

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from finetune.loggers import is_logging_step


def console_loggers() -> list[logging.Logger]:
    """The loggers that print the kit's `rank_zero_info` lines (samples written, export) to the terminal:
    Lightning's own `INFO: ...` handler on `lightning`, and on `lightning.pytorch` when nothing had configured
    logging before Lightning was imported."""
    loggers = [logging.getLogger(name) for name in ("lightning", "lightning.pytorch")]
    return [lg for lg in loggers if any(_prints_to_console(h) for h in lg.handlers)]


def _prints_to_console(handler: logging.Handler) -> bool:
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


class StepProgressBar(ProgressBar):
    """`step 12/40 |███  | 30% [00:04<00:09, 2.90step/s, train/loss=0.8123]` on rank zero, during `fit` only.

    The loss shown is the last logged one (the mean since the one before), refreshed every `trainer.log_every_n_steps`
    steps and at the last step.

    Starts at the resumed step when resuming. While the trainer validates (recipes with a val split), the bar
    says so in its description instead of opening a second bar. `mode=test` shows no bar (Lightning prints the
    `test/*` table at the end). To turn it off: `callbacks.progress=null`. tqdm limits redraws to ten a second.
    """

    def __init__(self):
        super().__init__()
        self.bar: tqdm | None = None
        self._enabled = True
        self._redirect = contextlib.ExitStack()

    def disable(self) -> None:
        """Called by Lightning on non-zero ranks (one bar per job, not one per GPU)."""
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args, sep: str = " ", end: str = "\n", file=None, nolock: bool = False) -> None:
        """`LightningModule.print` lands here: print above the bar instead of through it."""
        tqdm.write(sep.join(map(str, args)), file=file, end=end, nolock=nolock)

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not self._enabled:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else None  # None: epoch-bounded run, a counter
        fmt = "{desc} {n_fmt}/{total_fmt} |{bar}| {percentage:3.0f}% [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
        self.bar = tqdm(total=total, initial=trainer.global_step, desc="step", unit="step", file=sys.stderr,
                        dynamic_ncols=True, bar_format=fmt if total else None)
        # Log lines printed during training (samples written, export) go above the bar, not into it.
        self._redirect.enter_context(logging_redirect_tqdm(console_loggers()))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # With gradient accumulation several batches make one step: the bar moves when the step does.
        if self.bar is None or trainer.global_step == self.bar.n:
            return
        if is_logging_step(trainer, trainer.global_step - 1):
            # The loss changes on the logging cadence only (finetune/loggers.py): reading the metrics every step
            # would cost Python work, and for a metric logged on the device a wait for it.
            self.bar.set_postfix(_postfix(trainer.progress_bar_metrics), refresh=False)
        self.bar.update(trainer.global_step - self.bar.n)

    def on_validation_start(self, trainer, module) -> None:
        if self.bar is not None:  # None during the sanity check, which runs before on_train_start
            self.bar.set_description_str("step (validating)")

    def on_validation_end(self, trainer, module) -> None:
        if self.bar is not None:
            self.bar.set_description_str("step")

    def on_train_end(self, trainer, module) -> None:
        self._close()

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self._close()  # the traceback should start on its own line, with console logging restored

    def teardown(self, trainer, module, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self._redirect.close()


def _postfix(metrics: dict) -> dict[str, str]:
    """The progress-bar metrics (`self.log(..., prog_bar=True)`: train/loss), short enough for one line."""
    return {name: f"{value:.4g}" if isinstance(value, float) else str(value) for name, value in metrics.items()}
