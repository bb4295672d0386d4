"""Writing a file or a folder whole or not at all: the kit's one "temporary name, then rename" helper (checkpoints,
encoded-cache entries, tiny models and demo data, exports)."""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, replace: Callable[[Path, Path], None] = os.replace) -> Iterator[Path]:
    """A private temporary name next to `path` to write the file or build the folder at; when the block ends without
    an error, `replace(temporary, path)` puts it in place (by default `os.replace`, an atomic rename).

    The temporary name is in `path`'s own folder (so the rename never crosses file systems), hidden, and holds the
    process id, so processes sharing the folder (DDP ranks, runs started at once) never write into each other's
    files. Whatever is left at it afterwards (after an error or an interrupt, or what a custom `replace` did not
    move) is removed: a crash, a full disk or a kill leaves neither a truncated `path` nor a stray temporary. The
    temporary does not exist when the block starts (create the folder there yourself)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)  # left by a killed process that had the same id
    try:
        yield tmp
        replace(tmp, path)
    finally:
        _remove(tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
