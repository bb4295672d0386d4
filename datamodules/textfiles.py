"""Reading caption files with errors that name the file, the line and the fix."""

from __future__ import annotations

from pathlib import Path

from finetune.data import DataError

__all__ = ["DataError", "decode_utf8_lines", "read_lines"]


def decode_utf8_lines(path: Path) -> list[str]:
    """The lines of `path` decoded as UTF-8 (a BOM is dropped); a line that is not names itself."""
    lines = []
    for number, line in enumerate(path.read_bytes().splitlines(), start=1):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise DataError(f"{path}, line {number}: not valid UTF-8 ({err.reason} at byte {err.start}). "
                            f"Re-save the file as UTF-8 (e.g. `iconv -f GBK -t UTF-8`).") from None
    if lines:
        lines[0] = lines[0].lstrip("\ufeff")
    return lines


def read_lines(path: Path, what: str) -> list[str]:
    """Stripped UTF-8 lines of `path`; an empty entry (but a trailing blank line) is an error."""
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist. Create it (one entry per line) or set the "
                        f"data module's file option to the right name.")
    text = decode_utf8_lines(path)
    lines = []
    for number, line in enumerate(text, start=1):
        line = line.strip()
        if not line:
            if number == len(text):
                continue  # a trailing blank line is harmless
            raise DataError(f"{path}, line {number}: empty {what} entry. Remove the line or fill it in.")
        lines.append(line)
    return lines
