"""Saving validation samples to the run directory and logging them to the experiment tracker."""

from __future__ import annotations

import json
from pathlib import Path

from lightning.pytorch.loggers import Logger, WandbLogger

from finetune.family import Sample


def save_samples(samples: list[Sample], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(samples):
        if sample.kind == "video":
            from datamodules.video_io import write_video

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
