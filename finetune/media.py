"""Saving validation samples to the run directory and logging them to the experiment tracker."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
from lightning.pytorch.loggers import Logger, WandbLogger

from finetune.family import Sample


def save_samples(samples: list[Sample], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(samples):
        if sample.kind == "video":
            paths.append(write_video(directory / f"{i:02d}.mp4", sample.data, fps=sample.fps))
        elif sample.kind == "image":
            path = directory / f"{i:02d}.png"
            sample.data.save(path)
            paths.append(path)
        else:
            raise ValueError(f"unknown sample kind {sample.kind!r}")
    (directory / "prompts.json").write_text(
        json.dumps([s.caption for s in samples], ensure_ascii=False, indent=1), encoding="utf-8")
    return paths


def log_samples(loggers: list[Logger], samples: list[Sample], paths: list[Path], step: int,
                key: str = "val/samples") -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            media = [wandb.Video(str(p), caption=s.caption, format="mp4") if s.kind == "video"
                     else wandb.Image(str(p), caption=s.caption) for s, p in zip(samples, paths)]
            logger.experiment.log({key: media, "trainer/global_step": step})


def write_video(path: Path, frames: np.ndarray, fps: int = 8) -> Path:
    """uint8 [F, H, W, 3] -> H.264 mp4 (yuv420p, even sizes), playable in browsers and W&B."""
    path.parent.mkdir(parents=True, exist_ok=True)
    f, h, w, _ = frames.shape
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = w - w % 2, h - h % 2
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for image in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image[: stream.height, : stream.width]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
