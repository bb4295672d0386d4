"""Samplers whose order is a pure function of (seed, epoch) and that resume mid-epoch.

`ResumableEpochs` keeps the state they share -- the epoch, and how many of its items have been handed out -- with
the rules that make a resumed run draw exactly the batches an uninterrupted run draws (torchdata's
`StatefulDataLoader` saves `state_dict()` in the checkpoint), in this epoch and the next ones, however the loop
drives the sampler:

- Lightning calls `set_epoch` at the start of every epoch with the epoch it is in, on `loader.sampler` and on
  `loader.batch_sampler.sampler` (never on a batch sampler itself: a batch sampler exposes itself as its `sampler`).
  It moves to the start of that epoch, unless the sampler is in it already: a resumed run keeps its position.
- A pass that begins after its epoch was handed out completely begins the next epoch. Lightning ends an epoch after
  `len(loader)` batches without asking the sampler for one more, so the sampler cannot wait for its iterator to run
  out; and a loader with workers starts drawing as soon as it is created, before `set_epoch`: a run resumed from a
  checkpoint written at an epoch's last batch must then already start the next epoch, as the uninterrupted run does.
- A pass that begins mid-epoch continues it: that is where a resumed run stands (`load_state_dict`).

The model's noise draws never shift the data order: the order comes from generators seeded by (seed, epoch).
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch
from torch.utils.data import Sampler


class ResumableEpochs:
    """The epoch and position of a resumable sampler (see the module docstring); `yielded` counts the items of
    `epoch` handed out."""

    epoch: int = 0
    yielded: int = 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.yielded = epoch, 0

    def _pass(self, items_of: Callable[[int], Sequence]) -> Iterator:
        """Hands out `items_of(epoch)` from the current position; the state is read when the first item is asked
        for (after any `set_epoch` or `load_state_dict` that came between `iter()` and then)."""
        items = items_of(self.epoch)
        if items and self.yielded >= len(items):  # this epoch was handed out: this pass is the next one
            self.epoch, self.yielded = self.epoch + 1, 0
            items = items_of(self.epoch)
        for item in items[self.yielded:]:
            self.yielded += 1
            yield item

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.yielded = int(state["epoch"]), int(state["yielded"])


class ResumableShuffle(ResumableEpochs, Sampler[int]):
    """Indices `0..size-1`, shuffled by (seed, epoch) unless `shuffle` is false."""

    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.yielded = 0, 0

    def order(self, epoch: int | None = None) -> list[int]:
        """The indices of `epoch` (default: the current one) in the order they are handed out."""
        if not self.shuffle:
            return list(range(self.size))
        epoch = self.epoch if epoch is None else epoch
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self) -> Iterator[int]:
        return self._pass(self.order)

    def __len__(self) -> int:
        return self.size
