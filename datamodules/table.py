"""A table of Python columns as a map-style dataset, read a batch at a time through a transform.

What `datasets.Dataset.from_dict(columns).with_transform(transform)` gives a data module whose samples are rows of
paths, captions and sizes, without its costs at the start of a run: importing `datasets` (with pandas and pyarrow),
converting the table to Arrow, and fingerprinting the transform by pickling it (a bound method of a data module
pickles the data module and, once Lightning attached it, the trainer and the model: seconds for the tiny demo,
the whole model's weights for a real one).
"""

from __future__ import annotations

from typing import Callable

from torch.utils.data import Dataset


class TableDataset(Dataset):
    """`columns`: name -> one value per sample. `transform` receives a batch as columns (name -> the batch's values)
    and returns columns of processed samples; the loader receives one dict per sample, a batch per call
    (`__getitems__`), so the transform sees whole batches as with `datasets`."""

    def __init__(self, columns: dict[str, list], transform: Callable[[dict], dict]):
        lengths = {len(values) for values in columns.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns of different lengths: { {name: len(v) for name, v in columns.items()} }")
        self.columns, self.transform = columns, transform
        self.length = lengths.pop() if lengths else 0

    def __len__(self) -> int:
        return self.length

    def __getitems__(self, indices: list[int]) -> list[dict]:
        batch = {name: [values[i] for i in indices] for name, values in self.columns.items()}
        samples = self.transform(batch)
        return [dict(zip(samples, row)) for row in zip(*samples.values())]

    def __getitem__(self, index: int) -> dict:
        return self.__getitems__([index])[0]
