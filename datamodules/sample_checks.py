"""Checking every sample before the model loads: decoded in parallel, bad ones failed on or skipped.

`check_all` runs a check on every item on a thread pool (PIL and the video decoders release the GIL while they
decode), in order, with a progress bar for large sets; `BadSamples` applies `data.on_bad_sample`: `fail` stops
with every bad file named (all of them, so one pass fixes them), `skip` warns once per file, leaves it out and
says at the end how many were left out.
"""

from __future__ import annotations

import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal, TypeVar

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from finetune.data import DataError

OnBadSample = Literal["fail", "skip"]
PROGRESS_FROM = 500  # items; smaller sets are checked without a bar
SHOWN = 20  # bad files listed in a `fail` message

T = TypeVar("T")
R = TypeVar("R")


def check_all(items: Iterable[T], check: Callable[[T], R], total: int | None = None, what: str = "images",
              workers: int | None = None, progress_from: int | None = None) -> Iterator[R]:
    """`check(item)` for every item, in order, on `workers` threads (default: the CPUs, at most 8), with a bar from
    `progress_from` items (default PROGRESS_FROM). Items are taken a chunk at a time, so a lazily read dataset is
    never held in memory whole."""
    from tqdm.auto import tqdm

    workers = workers or min(8, os.cpu_count() or 1)
    items = iter(items)
    bar = tqdm(total=total, desc=f"checking {what}", unit=what.split()[-1][:5],
               disable=(total or 0) < (PROGRESS_FROM if progress_from is None else progress_from) or rank_zero_only.rank != 0)
    with ThreadPoolExecutor(max_workers=workers) as pool, bar:
        while chunk := list(itertools.islice(items, 32 * workers)):
            for result in pool.map(check, chunk):
                bar.update()
                yield result


class BadSamples:
    """Collects the problems of bad samples under `on_bad_sample` (`fail` or `skip`); `category` is the warning's
    under skip."""

    def __init__(self, on_bad_sample: str, what: str = "image", category: type[Warning] = UserWarning):
        if on_bad_sample not in ("fail", "skip"):
            raise DataError(f"data.on_bad_sample={on_bad_sample!r}: expected fail or skip.")
        self.policy, self.what, self.problems, self.category = on_bad_sample, what, [], category

    def add(self, problem: str) -> None:
        """One bad sample: `problem` names the file, what is wrong and the fix. Warned at once under skip."""
        self.problems.append(problem)
        if self.policy == "skip":
            rank_zero_warn(f"skipped (data.on_bad_sample=skip): {problem}", category=self.category)

    def finish(self, checked: int, fix: str = "") -> None:
        """Under `fail`, raise a DataError listing the bad samples; under `skip`, say how many were left out."""
        if not self.problems:
            return
        count = len(self.problems)
        if self.policy == "fail":
            shown = "\n  ".join(self.problems[:SHOWN]) + (f"\n  ... and {count - SHOWN} more" if count > SHOWN else "")
            raise DataError(f"{count} bad {self.what}(s) of {checked}:\n  {shown}\n{fix + ' ' if fix else ''}"
                            f"Or set data.on_bad_sample=skip to train without them.")
        rank_zero_warn(f"data.on_bad_sample=skip: left out {count} of {checked} {self.what}s (each named above).",
                       category=self.category)


class CheckedFiles:
    """What earlier full checks found out about media files, so an unchanged file is not decoded again: `check()`
    decodes every clip and image before the model loads, which at real sizes costs longer than a warm start's
    training step or two and buys nothing for a file that already passed.

    Keyed by a file's identity (`path|size|mtime`, or the hash of embedded bytes): a changed or replaced file is another
    key and is decoded again. The facts (an image's size, a clip's frame count and how far it decodes) live in one
    append-only JSON-lines file per kind under the kit's cache root (`<cache>/checked/<kind>.jsonl`); `recheck=True`
    ignores it (a file corrupted in place without a new mtime). Thread-safe: `check_all` runs checks on a pool."""

    def __init__(self, kind: str, recheck: bool = False, directory: str | os.PathLike | None = None):
        import threading

        from finetune.hub import cache_root

        self.path = Path(directory or cache_root() / "checked") / f"{kind}.jsonl"
        self.recheck = recheck
        self.known: dict[str, dict] = {} if recheck else self._read()
        self.new: dict[str, dict] = {}
        self.lock = threading.Lock()

    def _read(self) -> dict[str, dict]:
        known = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except OSError:
            return known
        for line in lines:
            try:
                entry = json.loads(line)
                known[entry["file"]] = entry["facts"]
            except (ValueError, KeyError, TypeError):
                continue  # a line cut short by a crash (or written by another version): that file is checked again
        return known

    def get(self, identity: str) -> dict | None:
        with self.lock:
            return self.new.get(identity) or self.known.get(identity)

    def put(self, identity: str, facts: dict) -> None:
        with self.lock:
            if self.known.get(identity) != facts:
                self.new[identity] = facts

    def save(self) -> None:
        """Append what this check learnt (one write of whole lines; concurrent runs only ever append)."""
        with self.lock:
            new, self.new = self.new, {}
        if not new or rank_zero_only.rank != 0:  # every rank checks the same files: one writes
            return
        self.known.update(new)
        text = "".join(json.dumps({"file": k, "facts": v}) + "\n" for k, v in new.items())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(text)
        except OSError as err:  # a read-only cache: the next run decodes again, nothing else changes
            rank_zero_warn(f"could not record checked files in {self.path} ({err}); the next run checks them again.")
