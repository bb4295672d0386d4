"""A deterministic generator of short captioned videos in the CogVideo finetune layout.

Coloured shapes move across a black background; each caption says which shape, which colour and which
way it moves, so a model can learn the mapping in a few hundred steps. Layout (THUDM/CogVideo
`finetune/` README): `prompts.txt` and `videos.txt` with one line per sample, `videos/NAME.mp4`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from finetune.hub import build_atomically
from finetune.media import write_video

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 90, 240), "yellow": (240, 220, 40)}
SHAPES = ("circle", "square")
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def demo_caption(colour: str, shape: str, motion: str) -> str:
    return f"a {colour} {shape} moves {motion} on a black background"


def render(colour: str, shape: str, motion: str, frames: int, size: int) -> np.ndarray:
    video = np.zeros((frames, size, size, 3), dtype=np.uint8)
    radius = size // 6
    dx, dy = MOTIONS[motion]
    yy, xx = np.mgrid[0:size, 0:size]
    travel = size - 2 * radius - 2
    for f in range(frames):
        progress = f / max(frames - 1, 1) - 0.5
        cx = size / 2 + dx * progress * travel
        cy = size / 2 + dy * progress * travel
        if shape == "circle":
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= radius**2
        else:
            mask = (np.abs(xx - cx) <= radius) & (np.abs(yy - cy) <= radius)
        video[f][mask] = COLOURS[colour]
    return video


def write_demo_videos(root: str | Path, count: int = 8, frames: int = 17, size: int = 64, fps: int = 8) -> Path:
    """Write `count` videos (cycling through colour x shape x motion) unless already there. Built in a private
    folder and renamed (`finetune.hub.build_atomically`): a half-written set is never used."""
    root = Path(root)
    if not (root / "videos.txt").exists():
        build_atomically(root, lambda tmp: _write_videos(tmp, count, frames, size, fps))
    return root


def _write_videos(root: Path, count: int, frames: int, size: int, fps: int) -> None:
    combos = list(itertools.product(COLOURS, SHAPES, MOTIONS))
    # Spread the first samples over all attributes rather than walking one colour first.
    order = [combos[(i * 13) % len(combos)] for i in range(count)]
    prompts, videos = [], []
    for i, (colour, shape, motion) in enumerate(order):
        name = f"videos/{i:04d}_{colour}_{shape}_{motion}.mp4"
        write_video(root / name, render(colour, shape, motion, frames, size), fps=fps)
        prompts.append(demo_caption(colour, shape, motion))
        videos.append(name)
    (root / "prompts.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
    (root / "videos.txt").write_text("\n".join(videos) + "\n", encoding="utf-8")


def write_raw_clips(folder: str | Path, count: int = 8, frames: int = 17, size: int = 64, fps: int = 8) -> Path:
    """The demo clips alone, without captions (`clip_NNNN.mp4` in `folder`): what a user's footage is before
    `cogft caption` (README "Preparing data")."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    combos = list(itertools.product(COLOURS, SHAPES, MOTIONS))
    for i in range(count):
        colour, shape, motion = combos[(i * 13) % len(combos)]
        write_video(folder / f"clip_{i:04d}.mp4", render(colour, shape, motion, frames, size), fps=fps)
    return folder


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m datamodules.demo_videos",
                                     description="Write the demo clips without captions into a folder.")
    parser.add_argument("folder")
    parser.add_argument("--count", type=int, default=8)
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error(f"--count {args.count}: use 1 or more")
    print(write_raw_clips(args.folder, args.count))


if __name__ == "__main__":
    main()
