"""A shuffling sampler whose order is a pure function of (seed, epoch) and that resumes mid-epoch.

Lightning calls `set_epoch` every epoch; torchdata's `StatefulDataLoader` saves `state_dict()` in the
checkpoint, so a resumed run draws exactly the batches an uninterrupted run would have drawn, in this
epoch and the next ones, and the model's noise draws never shift the data order.
"""

from __future__ import annotations

import torch
from torch.utils.data import Sampler


class ResumableShuffle(Sampler[int]):
    def __init__(self, size: int, seed: int = 0, shuffle: bool = True):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.yielded, self._resume_at = 0, 0, 0

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self._resume_at = epoch, 0

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.size))
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.size, generator=generator).tolist()

    def __iter__(self):
        order = self.order()
        start, self._resume_at = self._resume_at, 0
        self.yielded = start
        for index in order[start:]:
            self.yielded += 1
            yield index

    def __len__(self) -> int:
        return self.size

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self._resume_at = state["epoch"], state["yielded"]
        self.yielded = self._resume_at
