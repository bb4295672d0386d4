"""What the kit trims from Lightning's per-step loop
(docs/benchmarks.md#the-training-step-against-a-bare-pytorch-loop-benchstep_overheadpy).

Lightning dispatches every hook of a step through the trainer's profiler, for every callback, whether the callback
implements the hook or not: about 150 context managers a step with the kit's callbacks, each a generator-based
`contextlib` manager even for the default `PassThroughProfiler`, and each named with the callback's `state_key`
(which `ModelCheckpoint` rebuilds from its settings every time). At a 25 ms step that is a few percent of the step.

- `quiet_profiler()`: the trainer's profiler when `trainer.profiler` is not set: `PassThroughProfiler` whose
  `profile` hands back one inert context manager instead of making a new one per hook. `trainer.profiler=simple`
  (or `advanced`, `pytorch`) still profiles as Lightning does.
- `StepCheckpoint`: Lightning's `ModelCheckpoint` with its `state_key` computed once, and the same string as
  `ModelCheckpoint`'s (its class name included), so the checkpoints it writes and reads are unchanged.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import PassThroughProfiler


class _Inert:
    """A context manager that does nothing; one instance serves every hook (it keeps no state)."""

    def __enter__(self):
        return None

    def __exit__(self, *exc) -> bool:
        return False


_INERT = _Inert()


class QuietProfiler(PassThroughProfiler):
    """No profiling, and no context manager made per hook call."""

    def profile(self, action_name: str):
        return _INERT


def quiet_profiler() -> QuietProfiler:
    return QuietProfiler()


class StepCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose `state_key` (the name its state is saved under in a checkpoint, built from monitor, mode
    and the save triggers) is computed on first use and kept: Lightning reads it for every hook of every step."""

    @property
    def state_key(self) -> str:
        key = self.__dict__.get("_state_key")
        if key is None:
            # under ModelCheckpoint's own name, as Lightning writes it: checkpoints of either class resume with the other
            key = super().state_key.replace(type(self).__qualname__, ModelCheckpoint.__qualname__, 1)
            self.__dict__["_state_key"] = key
        return key
