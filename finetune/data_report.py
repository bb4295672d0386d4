"""The data report: what a run trains on, before any GPU hour is spent (`cogft data`, and the start of every run).

From a checked data module's `report_rows()` (one row per training sample: its file, caption, bucket, frame count
and own size, and a `thumbnail()` of it; `datamodules/images.py`, `datamodules/video.py`) and the family's
`Processor.text_limit` (the text encoder's tokenizer and `max_sequence_length`):

- samples per bucket (frames x height x width), the clips' frame counts, the files' own resolutions;
- caption token lengths (min / median / max) and the captions longer than the encoder reads: every peer cuts them
  off silently, the report counts them and names the first few; `data.on_long_caption` decides what happens to
  them: `warn` (the default: one warning with the count and the first files), `fail` (stop before the model
  loads, with the fix) or `truncate` (accepted: the encoder reads their first `max_sequence_length` tokens, said in
  one line of the report and no warning);
- the files left out by `data.on_bad_sample=skip`, each with why;
- `contact_sheet`: a PNG with one thumbnail per sample (a clip's first frame, or the image), grouped by bucket,
  its caption under it; logged to W&B as `data/sheet` during a run.
"""

from __future__ import annotations

import json
import statistics
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from finetune.data import DataError

LONG_SHOWN = 5  # long captions named in the report
LONG_CAPTION_POLICIES = ("warn", "fail", "truncate")
SHEET_LIMIT = 64  # thumbnails in a run's sheet (`cogft data --sheet` draws every sample)


@dataclass
class DataReport:
    samples: int
    kinds: Counter
    buckets: Counter  # (frames, height, width) -> samples
    frames: Counter  # a clip's own frame count -> clips
    sizes: Counter  # a file's own (height, width) -> files
    tokens: list[int] | None = None  # each caption's token count; None: the family names no text limit
    encoder: str | None = None
    max_tokens: int | None = None
    long: list[tuple[str, int]] = field(default_factory=list)  # (file, tokens) of the captions over the limit
    skipped: list[str] = field(default_factory=list)
    policy: str = "warn"

    def lines(self) -> list[str]:
        kinds = ", ".join(f"{n} {kind}{'s' if n != 1 else ''}" for kind, n in sorted(self.kinds.items()))
        out = [f"data: {self.samples} samples ({kinds})"]
        out.append("  buckets (frames x height x width): " + ", ".join(
            f"{f}x{h}x{w}: {n}" for (f, h, w), n in sorted(self.buckets.items())))
        clips = {f: n for f, n in self.frames.items() if f != 1 or self.kinds.get("video")}
        if self.kinds.get("video"):
            out.append("  frames per clip: " + ", ".join(f"{f}: {n}" for f, n in sorted(clips.items())))
        out.append("  resolutions (height x width): " + _top(self.sizes, lambda hw: f"{hw[0]}x{hw[1]}"))
        if self.tokens:
            out.append(f"  caption tokens ({self.encoder}): min {min(self.tokens)}, median "
                       f"{statistics.median(self.tokens):g}, max {max(self.tokens)}; the encoder reads "
                       f"{self.max_tokens}")
            if self.long:
                what = {"warn": "cut off there by the text encoder", "fail": "data.on_long_caption=fail stops the run",
                        "truncate": "cut off there (data.on_long_caption=truncate)"}[self.policy]
                out.append(f"  long captions: {len(self.long)} of {self.samples} are over {self.max_tokens} tokens "
                           f"({what}): " + ", ".join(f"{Path(f).name} ({n})" for f, n in self.long[:LONG_SHOWN])
                           + (f", ... and {len(self.long) - LONG_SHOWN} more" if len(self.long) > LONG_SHOWN else ""))
            else:
                out.append(f"  long captions: none over {self.max_tokens} tokens")
        if self.skipped:
            out.append(f"  skipped: {len(self.skipped)} file(s) (data.on_bad_sample=skip)")
            out += [f"    {why}" for why in self.skipped]
        return out

    def text(self) -> str:
        return "\n".join(self.lines())

    def as_dict(self) -> dict:
        return {"samples": self.samples, "kinds": dict(self.kinds),
                "buckets": {"x".join(map(str, b)): n for b, n in sorted(self.buckets.items())},
                "frames": dict(sorted(self.frames.items())),
                "resolutions": {f"{h}x{w}": n for (h, w), n in sorted(self.sizes.items())},
                "caption_tokens": self.tokens, "encoder": self.encoder, "max_tokens": self.max_tokens,
                "long_captions": [{"file": f, "tokens": n} for f, n in self.long], "skipped": self.skipped}


def _top(counter: Counter, name, shown: int = 6) -> str:
    common = counter.most_common()
    text = ", ".join(f"{name(k)}: {n}" for k, n in common[:shown])
    return text + (f", ... ({len(common) - shown} more)" if len(common) > shown else "")


def report_rows(datamodule) -> list[dict] | None:
    """The data module's rows (after its `check()`), or None for one that gives none (e.g. the captcha data)."""
    rows = getattr(datamodule, "report_rows", None)
    return rows() if callable(rows) else None


def data_report(datamodule, rows: list[dict] | None = None) -> DataReport | None:
    """The report of a checked, connected data module (None: it gives no rows)."""
    rows = report_rows(datamodule) if rows is None else rows
    if rows is None:
        return None
    policy = getattr(datamodule, "on_long_caption", "warn")
    if policy not in LONG_CAPTION_POLICIES:
        raise DataError(f"data.on_long_caption={policy!r}: use warn (say so and train), fail (stop before the model "
                        f"loads) or truncate (train on the tokens the encoder reads, without a warning).")
    report = DataReport(samples=len(rows), kinds=Counter(r["kind"] for r in rows),
                        buckets=Counter(tuple(r["bucket"]) for r in rows),
                        frames=Counter(r["frames"] for r in rows if r["kind"] == "video"),
                        sizes=Counter(tuple(r["size"]) for r in rows if r.get("size")),
                        skipped=list(getattr(datamodule, "skipped", []) or []), policy=policy)
    limit = getattr(datamodule.require_processor(), "text_limit", None)
    if limit is not None and rows:
        unique = list(dict.fromkeys(r["caption"] for r in rows))  # repeated roots: each caption counted once
        counted = dict(zip(unique, limit.count(unique)))
        report.tokens = [counted[r["caption"]] for r in rows]
        report.encoder, report.max_tokens = limit.encoder, limit.max_tokens
        seen = set()
        for row, n in zip(rows, report.tokens):
            if n > limit.max_tokens and row["file"] not in seen:
                seen.add(row["file"])
                report.long.append((row["file"], n))
    return report


def check_long_captions(report: DataReport | None) -> None:
    """`data.on_long_caption`: `fail` raises a DataError naming the long captions; `warn` warns once."""
    if report is None or not report.long:
        return
    files = ", ".join(f"{f} ({n} tokens)" for f, n in report.long[:LONG_SHOWN])
    more = f", ... and {len(report.long) - LONG_SHOWN} more" if len(report.long) > LONG_SHOWN else ""
    message = (f"{len(report.long)} of {report.samples} captions are longer than the {report.max_tokens} "
               f"{report.encoder} tokens the text encoder reads: {files}{more}.")
    if report.policy == "fail":
        raise DataError(f"{message} Shorten them, raise model.max_sequence_length (where the model takes it), or set "
                        f"data.on_long_caption=truncate (train on their first {report.max_tokens} tokens) or warn.")
    if report.policy == "warn":
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"{message} Their ends are cut off. data.on_long_caption=fail stops on them, truncate accepts "
                       f"them without this warning.", category=LongCaptionWarning)


class LongCaptionWarning(UserWarning):
    """Captions longer than the text encoder reads (`data.on_long_caption=warn`)."""


def contact_sheet(rows: list[dict], path: str | Path, tile: int = 160, columns: int = 6,
                  limit: int | None = None) -> Path:
    """A PNG of one thumbnail per sample (`row["thumbnail"]()`: a clip's first frame, or the image, fitted into
    `tile` x `tile`), grouped by bucket (a heading per bucket), the caption under each (wrapped, cut at 3 lines).
    `limit`: at most that many tiles (the first of each bucket in turn). The PNG's `cogft:tiles` text says which
    sample each tile shows. Returns the path."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row["bucket"]), []).append(row)
    if limit is not None:
        groups = _limited(groups, limit)
    font = ImageFont.load_default()
    line_h, caption_lines, heading_h, pad = 12, 3, 20, 6
    cell_w, cell_h = tile + pad, tile + caption_lines * line_h + pad
    chars = max(8, tile // 6)
    height = sum(heading_h + -(-len(g) // columns) * cell_h for g in groups.values()) + pad
    sheet = Image.new("RGB", (columns * cell_w + pad, max(height, heading_h)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    y, boxes = pad, []
    for bucket, group in sorted(groups.items()):
        draw.text((pad, y + 3), f"bucket {'x'.join(map(str, bucket))} (frames x height x width): {len(group)}",
                  fill=(255, 220, 120), font=font)
        y += heading_h
        for i, row in enumerate(group):
            x0, y0 = pad + (i % columns) * cell_w, y + (i // columns) * cell_h
            boxes.append({"file": row["file"], "bucket": list(bucket), "box": [x0, y0, x0 + tile, y0 + tile]})
            try:
                picture = Image.fromarray(np.asarray(row["thumbnail"](), dtype=np.uint8))
                picture.thumbnail((tile, tile))
                sheet.paste(picture, (x0 + (tile - picture.width) // 2, y0 + (tile - picture.height) // 2))
            except Exception as err:  # a file that changed since the check: say so in its tile
                draw.text((x0, y0 + tile // 2), f"unreadable: {type(err).__name__}", fill=(255, 80, 80), font=font)
            lines = textwrap.wrap(row["caption"], chars)[:caption_lines]
            for k, text in enumerate(lines):
                draw.text((x0, y0 + tile + 2 + k * line_h), text, fill=(230, 230, 230), font=font)
        y += -(-len(group) // columns) * cell_h
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()  # which sample each tile shows (`cogft:tiles`: file, bucket, box), for scripts and tests
    info.add_text("cogft:tiles", json.dumps(boxes, ensure_ascii=False))
    sheet.save(path, pnginfo=info)
    return path


def _limited(groups: dict, limit: int) -> dict:
    """At most `limit` rows, taken from the buckets in turn (every bucket shown while the limit allows)."""
    kept = {b: [] for b in groups}
    queues = {b: list(g) for b, g in groups.items()}
    while limit > 0 and any(queues.values()):
        for b, queue in queues.items():
            if queue and limit > 0:
                kept[b].append(queue.pop(0))
                limit -= 1
    return {b: g for b, g in kept.items() if g}


def sheet_tiles(rows: list[dict], limit: int | None = None) -> int:
    """How many tiles `contact_sheet(rows, limit=limit)` draws."""
    return len(rows) if limit is None else min(len(rows), limit)


def log_report(loggers, report: DataReport, sheet: Path | None) -> None:
    """To W&B: the report as `data/report` (text) and its numbers in the run summary, the sheet as `data/sheet`.
    With a W&B run still starting in the background (`finetune.loggers.BackgroundWandbLogger.after_start`) the
    logging happens in its starting thread, so the run's start does not wait for W&B (0.75 s of the tiny demo's)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue

        def log_data_report(run) -> None:
            import wandb

            logged = {"data/report": wandb.Html("<pre>" + _escape(report.text()) + "</pre>")}
            if sheet is not None:
                logged["data/sheet"] = wandb.Image(str(sheet), caption=f"{report.samples} samples by bucket")
            run.log(logged)
            run.summary["data/samples"] = report.samples
            run.summary["data/long_captions"] = len(report.long)
            run.summary["data/skipped"] = len(report.skipped)

        if hasattr(logger, "after_start"):
            logger.after_start(log_data_report)
        else:
            log_data_report(logger.experiment)


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
