"""Sample grids: one picture per validation and one of the whole run, so a glance tells whether it goes right.

- `samples/step_NNNNNN/grid.png` (`val/grid`): prompts as rows, the image or `GRID_FRAMES` evenly spaced frames of
  each video as columns, each row under its prompt (truncated).
- `samples/step_NNNNNN/grid.gif` (`val/grid_video`, video only): the prompts' videos stacked and playing, an
  animated GIF a browser (and W&B) plays.
- `samples/progress.png` (`val/progress`, at the end of training): prompts as rows, every validation step as a
  column (the middle frame of each video), read from the files on disk, so the steps before a resume are in it.

Tiles are downscaled to at most `MAX_TILE` pixels a side. W&B gets them as media, TensorBoard as images (the GIF is
W&B only); the CSV logger nothing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import av
import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from PIL import Image, ImageDraw, ImageFont

from finetune.family import Sample

GRID_FRAMES = 8    # frames of each video in grid.png
MAX_TILE = 256     # the longest side of a tile, in pixels
LABEL_H = 14       # the height of a label band (above each row; above the columns of the progress grid)
LABEL_CHARS = 60   # a prompt label is cut to this many characters (and to the grid's width)
BACKGROUND = (0, 0, 0)
INK = (255, 255, 255)
SAMPLE_FILE = re.compile(r"^(\d{2,})\.(mp4|png)$")   # 00.mp4, 01.png (not 00_condition.png, not grid.png)


def tile_size(size: tuple[int, int], max_tile: int = MAX_TILE) -> tuple[int, int]:
    """(w, h) scaled down (never up) so the longest side is at most `max_tile`."""
    w, h = size
    scale = min(1.0, max_tile / max(w, h))
    return max(1, round(w * scale)), max(1, round(h * scale))


def evenly_spaced(count: int, n: int) -> list[int]:
    """`n` frame indices spread over `count` frames, first and last included (all of them if fewer)."""
    if count <= n:
        return list(range(count))
    return [int(i) for i in np.linspace(0, count - 1, n).round()]


def _font():
    try:
        return ImageFont.load_default()
    except OSError:  # no font at all: no labels
        return None


def _label(draw: ImageDraw.ImageDraw, xy: tuple[int, int], text: str, width: int, font) -> None:
    if font is None or not text:
        return
    text = " ".join(text.split())
    if len(text) > LABEL_CHARS:
        text = text[:LABEL_CHARS - 3] + "..."
    while len(text) > 3 and draw.textlength(text, font=font) > width - 4:
        text = text[:-4] + "..."
    try:
        draw.text((xy[0] + 2, xy[1] + 1), text, fill=INK, font=font)
    except (UnicodeEncodeError, ValueError):  # a bitmap font without these characters
        draw.text((xy[0] + 2, xy[1] + 1), text.encode("ascii", "replace").decode(), fill=INK, font=font)


def compose(cells: list[list[Image.Image | None]], row_labels: list[str], column_labels: list[str] | None = None,
            max_tile: int = MAX_TILE) -> Image.Image:
    """Rows of tiles, each row under a `LABEL_H` band with its label; with `column_labels`, one more band on top.
    Every tile takes the size of the first (downscaled to `max_tile`); a missing cell (None) stays background.
    Size: (columns * tile_w, [LABEL_H +] rows * (LABEL_H + tile_h))."""
    first = next(cell for row in cells for cell in row if cell is not None)
    tw, th = tile_size(first.size, max_tile)
    columns = max(len(row) for row in cells)
    top = LABEL_H if column_labels is not None else 0
    grid = Image.new("RGB", (columns * tw, top + len(cells) * (LABEL_H + th)), BACKGROUND)
    draw, font = ImageDraw.Draw(grid), _font()
    for c, text in enumerate(column_labels or []):
        _label(draw, (c * tw, 0), text, tw, font)
    for r, row in enumerate(cells):
        y = top + r * (LABEL_H + th)
        _label(draw, (0, y), row_labels[r] if r < len(row_labels) else "", grid.width, font)
        for c, cell in enumerate(row):
            if cell is not None:
                grid.paste(cell.convert("RGB").resize((tw, th), Image.BILINEAR), (c * tw, y + LABEL_H))
    return grid


def _frames(sample: Sample) -> list[Image.Image]:
    if sample.kind == "video":
        return [Image.fromarray(np.asarray(frame)) for frame in sample.data]
    if sample.kind == "image":
        return [sample.data]
    return []


def sample_grid(samples: list[Sample], frames: int = GRID_FRAMES, max_tile: int = MAX_TILE) -> Image.Image | None:
    """Prompts as rows, the image or `frames` evenly spaced frames of each video as columns; None: nothing visual."""
    rows, labels = [], []
    for sample in samples:
        all_frames = _frames(sample)
        if all_frames:
            rows.append([all_frames[i] for i in evenly_spaced(len(all_frames), frames)])
            labels.append(sample.caption)
    return compose(rows, labels, max_tile=max_tile) if rows else None


def write_gif(samples: list[Sample], path: Path, max_tile: int = MAX_TILE) -> Path | None:
    """The videos stacked (one per row, under its prompt), all frames playing in a loop; a shorter video holds its
    last frame. None (nothing written) without a video."""
    videos = [s for s in samples if s.kind == "video" and len(s.data)]
    if not videos:
        return None
    clips = [_frames(s) for s in videos]
    length = max(len(clip) for clip in clips)
    pictures = [compose([[clip[min(i, len(clip) - 1)]] for clip in clips], [s.caption for s in videos],
                        max_tile=max_tile) for i in range(length)]
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=round(1000 / max(1, videos[0].fps)),
                     loop=0)
    return path


def write_grids(samples: list[Sample], directory: Path, frames: int = GRID_FRAMES) -> list[Path]:
    """`directory/grid.png` and, for videos, `directory/grid.gif`: the paths written."""
    written = []
    grid = sample_grid(samples, frames=frames)
    if grid is not None:
        directory.mkdir(parents=True, exist_ok=True)
        grid.save(directory / "grid.png")
        written.append(directory / "grid.png")
    gif = write_gif(samples, directory / "grid.gif")
    if gif is not None:
        written.append(gif)
    return written


# -- the run's progress, from the files on disk --------------------------------------------------------------------

def representative_frame(path: Path) -> Image.Image | None:
    """The middle frame of a video file, or the image; None if it cannot be read (e.g. cut short by a crash)."""
    try:
        if path.suffix == ".png":
            with Image.open(path) as image:
                return image.convert("RGB")
        with av.open(str(path)) as container:
            decoded = [frame.to_image() for frame in container.decode(video=0)]
        return decoded[len(decoded) // 2] if decoded else None
    except (OSError, av.FFmpegError, ValueError):
        return None


def saved_steps(samples_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every `step_NNNNNN/` holding samples, in step order."""
    found = []
    for folder in samples_dir.glob("step_*"):
        match = re.fullmatch(r"step_(\d+)", folder.name)
        if match and folder.is_dir() and any(SAMPLE_FILE.match(p.name) for p in folder.iterdir()):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def progress_grid(samples_dir: Path, max_tile: int = MAX_TILE) -> Image.Image | None:
    """Prompts as rows, steps as columns (labelled `step N`), one representative frame per sample; None: no saved
    samples."""
    steps = saved_steps(samples_dir)
    if not steps:
        return None
    columns, prompts = [], {}
    for _, folder in steps:
        matches = (SAMPLE_FILE.match(p.name) for p in folder.iterdir())
        columns.append({int(m.group(1)): folder / m.group(0) for m in matches if m})
        names = folder / "prompts.json"
        if names.exists():  # the latest step's prompt of each row wins
            prompts.update(enumerate(json.loads(names.read_text(encoding="utf-8"))))
    count = max(max(files) + 1 for files in columns)
    cells = [[representative_frame(files[i]) if i in files else None for files in columns] for i in range(count)]
    if all(cell is None for row in cells for cell in row):
        return None
    return compose(cells, [prompts.get(i, "") for i in range(count)], [f"step {step}" for step, _ in steps],
                   max_tile=max_tile)


def write_progress(samples_dir: Path) -> Path | None:
    grid = progress_grid(samples_dir)
    if grid is None:
        return None
    path = samples_dir / "progress.png"
    grid.save(path)
    return path


# -- logging -------------------------------------------------------------------------------------------------------

def wandb_grids(directory: Path) -> dict:
    """The W&B media of one validation's grids: `val/grid` (and `val/grid_video`), for the samples' log call."""
    import wandb

    media = {}
    if (directory / "grid.png").exists():
        media["val/grid"] = wandb.Image(str(directory / "grid.png"))
    if (directory / "grid.gif").exists():
        media["val/grid_video"] = wandb.Video(str(directory / "grid.gif"), format="gif")
    return media


def tensorboard_image(loggers: list[Logger], key: str, path: Path, step: int) -> None:
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            with Image.open(path) as image:
                logger.experiment.add_image(key, np.asarray(image.convert("RGB")), step, dataformats="HWC")


def log_progress(loggers: list[Logger], samples_dir: Path, step: int) -> Path | None:
    """At the end of training: write `samples/progress.png` from every saved validation and log it as
    `val/progress` (W&B, TensorBoard)."""
    path = write_progress(samples_dir)
    if path is None:
        return None
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            logger.experiment.log({"val/progress": wandb.Image(str(path)), "trainer/global_step": step})
    tensorboard_image(loggers, "val/progress", path, step)
    return path
