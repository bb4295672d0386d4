"""Reading caption files with errors that name the file, the line and the fix."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad training data, found before any expensive work starts."""


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty-checked, stripped UTF-8 lines of `path`."""
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist. Create it (one entry per line) or set the "
                        f"data module's file option to the right name.")
    raw = path.read_bytes()
    lines, text = [], []
    for number, line in enumerate(raw.splitlines(), start=1):
        try:
            text.append(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid UTF-8 ({err.reason} at byte {err.start}). "
                            f"Re-save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8`).") from None
    for number, line in enumerate(text, start=1):
        line = line.strip().lstrip("\ufeff")
        if not line:
            if number == len(text):
                continue  # a trailing blank line is harmless
            raise DataError(f"{path}, line {number}: empty {what} entry. Remove the line or fill it in.")
        lines.append(line)
    return lines
