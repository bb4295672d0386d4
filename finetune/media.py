"""Saving validation samples to the run directory and logging them to the experiment tracker (with the image each
image-to-video sample was conditioned on next to it: `00_condition.png`, W&B `val/samples_condition`), and their
grids (`grid.png`, `grid.gif`: `finetune.grids`)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
from lightning.pytorch.loggers import Logger, WandbLogger

from finetune.family import Sample
from finetune.grids import tensorboard_image, wandb_grids, write_grids


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
        if sample.condition is not None:  # the image an image-to-video sample starts from, next to it
            sample.condition.save(condition_path(paths[-1]))
    (directory / "prompts.json").write_text(
        json.dumps([s.caption for s in samples], ensure_ascii=False, indent=1), encoding="utf-8")
    write_grids(samples, directory)
    return paths


def log_samples(loggers: list[Logger], samples: list[Sample], paths: list[Path], step: int,
                key: str = "val/samples") -> None:
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            import wandb

            media = [wandb.Video(str(p), caption=s.caption, format="mp4") if s.kind == "video"
                     else wandb.Image(str(p), caption=s.caption) for s, p in zip(samples, paths)]
            logged = {key: media, "trainer/global_step": step}
            if any(s.condition is not None for s in samples):  # `val/samples_condition`, in the same order
                logged[f"{key}_condition"] = [wandb.Image(str(condition_path(p)), caption=s.caption)
                                              for s, p in zip(samples, paths) if s.condition is not None]
            logged.update(wandb_grids(paths[0].parent) if paths else {})  # `val/grid`, `val/grid_video`
            if hasattr(logger, "after_start"):  # a W&B run still starting: logged by its starting thread
                logger.after_start(lambda run, logged=logged: run.log(logged))
            else:
                logger.experiment.log(logged)
    if paths and (paths[0].parent / "grid.png").exists():
        tensorboard_image(loggers, "val/grid", paths[0].parent / "grid.png", step)


def condition_path(sample_path: Path) -> Path:
    """Where a sample's conditioning image is saved: `00.mp4` -> `00_condition.png`."""
    return sample_path.with_name(f"{sample_path.stem}_condition.png")


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
