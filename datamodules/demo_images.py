"""A deterministic generator of captioned images in the image-folder layout (`metadata.jsonl`).

Coloured shapes on a plain background, at several aspect ratios, captioned alternately in English and
Chinese (CogView4 is bilingual), so a model can learn the mapping and the aspect buckets get exercised.
Layout (Hugging Face `imagefolder`, CogKit's t2i data): `metadata.jsonl` with `file_name` and `text`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from PIL import Image, ImageDraw

from finetune.hub import build_atomically

COLOURS = {"red": ("红色", (220, 40, 40)), "green": ("绿色", (40, 190, 60)), "blue": ("蓝色", (50, 90, 240)),
           "yellow": ("黄色", (240, 210, 40))}
SHAPES = {"circle": "圆形", "square": "正方形", "triangle": "三角形"}
BACKGROUNDS = {"white": ("白色", (245, 245, 245)), "black": ("黑色", (12, 12, 12))}
SIZES = ((96, 96), (64, 128), (128, 64), (96, 128), (128, 96), (80, 80))  # (height, width): 1:1, 1:2, 2:1, 3:4...


def demo_caption(colour: str, shape: str, background: str, chinese: bool) -> str:
    if chinese:
        return f"{BACKGROUNDS[background][0]}背景上的一个{COLOURS[colour][0]}{SHAPES[shape]}"
    return f"a {colour} {shape} on a {background} background"


def render(colour: str, shape: str, background: str, height: int, width: int) -> Image.Image:
    image = Image.new("RGB", (width, height), BACKGROUNDS[background][1])
    draw = ImageDraw.Draw(image)
    r = min(height, width) // 3
    cx, cy = width // 2, height // 2
    fill = COLOURS[colour][1]
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return image


def write_demo_images(root: str | Path, count: int = 12) -> Path:
    """Write `count` images (cycling colour x shape x background, sizes and languages alternating) unless
    already there. Built in a private folder and renamed (`finetune.hub.build_atomically`), so a half-written
    set is never used and two runs starting at once do not collide."""
    root = Path(root)
    if not (root / "metadata.jsonl").exists():
        build_atomically(root, lambda tmp: _write_images(tmp, count))
    return root


def _write_images(tmp: Path, count: int) -> None:
    tmp.mkdir(parents=True, exist_ok=True)
    combos = list(itertools.product(BACKGROUNDS, COLOURS, SHAPES))
    lines = []
    for i in range(count):
        background, colour, shape = combos[(i * 7) % len(combos)]  # spread attributes over the first samples
        height, width = SIZES[i % len(SIZES)]
        name = f"{i:04d}_{colour}_{shape}_{background}.png"
        render(colour, shape, background, height, width).save(tmp / name)
        caption = demo_caption(colour, shape, background, chinese=i % 2 == 1)
        lines.append(json.dumps({"file_name": name, "text": caption}, ensure_ascii=False))
    (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
