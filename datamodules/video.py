"""Video-caption data in the CogVideo finetune layout, on Hugging Face `datasets`.

`root/prompts.txt` and `root/videos.txt` hold one caption and one video path (relative to root) per
line. Videos are decoded with PyAV, `num_frames` frames are sampled evenly from the clip, and each frame
is resized (shorter side) and centre-cropped to the training resolution, then scaled to [-1, 1]. The
resolution and frame count are the model family's (`finetune.data.VideoSpec`, handed over by the engine).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from datamodules.sampling import ResumableShuffle
from datamodules.textfiles import DataError, read_lines
from datamodules.video_io import count_frames, read_frames
from finetune.data import FamilyDataModule, VideoSpec
from finetune.hub import cache_root


def frame_indices(available: int, wanted: int) -> list[int]:
    """`wanted` frames evenly strided from the clip's start (as the official loader: stride = n // wanted)."""
    stride = max(1, available // wanted)
    return list(range(0, stride * wanted, stride))


def resize_crop(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 [F, H, W, 3] -> float [F, 3, height, width] in [-1, 1]: scale the shorter side, crop centre."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2).float()
    _, _, h, w = video.shape
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    video = F.interpolate(video, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    video = video[:, :, top: top + height, left: left + width]
    return (video / 127.5 - 1.0).clamp(-1.0, 1.0)


def _file_key(path: Path, extra: str) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{hashlib.sha256(extra.encode()).hexdigest()}"


class VideoDataModule(FamilyDataModule):
    """Args:
        root: the dataset folder, or `demo` for the generated demo set (written once to the cache).
        prompt_file, video_file: the caption and path lists inside root.
        batch_size: per device; videos in a batch share one resolution.
        num_workers: decoding processes.
        seed: order of the shuffled samples (independent of the model's noise draws).
        demo_count: samples of the generated demo set (root=demo).
    The resolution and frame count come from the model family (`connect`).
    """

    spec_type = VideoSpec

    def __init__(self, root: str, prompt_file: str = "prompts.txt", video_file: str = "videos.txt",
                 batch_size: int = 1, num_workers: int = 0, seed: int = 0, demo_count: int = 8):
        super().__init__()
        self.root, self.prompt_file, self.video_file = root, prompt_file, video_file
        self.batch_size, self.num_workers, self.seed, self.demo_count = batch_size, num_workers, seed, demo_count
        self.records: list[dict] | None = None

    def dataset_root(self) -> Path:
        if self.root == "demo":
            from datamodules.demo_videos import write_demo_videos

            return write_demo_videos(cache_root() / "data" / f"demo_videos_{self.demo_count}", count=self.demo_count)
        return Path(self.root).expanduser()

    def check(self) -> list[dict]:
        """Validate everything that can be wrong with the data before the model is loaded."""
        if self.records is not None:
            return self.records
        spec: VideoSpec = self.require_processor().spec
        root = self.dataset_root()
        if not root.is_dir():
            raise DataError(f"data.root={self.root!r} is not a directory. Point it at the folder holding "
                            f"{self.prompt_file} and {self.video_file}, or use data.root=demo.")
        prompts = read_lines(root / self.prompt_file, "caption")
        videos = read_lines(root / self.video_file, "video path")
        if len(prompts) != len(videos):
            raise DataError(f"{root / self.prompt_file} has {len(prompts)} captions but {root / self.video_file} "
                            f"has {len(videos)} videos: line i of one must describe line i of the other.")
        records = []
        for line, (prompt, name) in enumerate(zip(prompts, videos), start=1):
            path = root / name
            if not path.is_file():
                raise DataError(f"{root / self.video_file}, line {line}: {path} does not exist. Fix the path "
                                f"(relative to {root}) or remove the line and its caption.")
            try:
                frames, _, _ = count_frames(path)
            except Exception as err:
                raise DataError(f"{path}: cannot be decoded ({type(err).__name__}: {err}). Re-encode it, e.g. "
                                f"`ffmpeg -i IN -c:v libx264 -pix_fmt yuv420p OUT.mp4`, or remove it.") from None
            if frames < spec.num_frames:
                raise DataError(f"{path}: has {frames} frames but model.num_frames={spec.num_frames} are needed. "
                                f"Use a longer clip, remove it, or lower model.num_frames to at most {frames} "
                                f"(within the model's frame rule).")
            records.append({"prompt": prompt, "video": str(path), "frames": frames,
                            "key": _file_key(path, prompt)})
        self.records = records
        return records

    def setup(self, stage: str | None = None) -> None:
        import datasets

        records = self.check()
        table = {name: [r[name] for r in records] for name in ("prompt", "video", "frames", "key")}
        self.dataset = datasets.Dataset.from_dict(table).with_transform(self._decode)

    def _decode(self, batch: dict) -> dict:
        spec: VideoSpec = self.processor.spec
        samples = [self.processor({"video": resize_crop(read_frames(Path(p), frame_indices(n, spec.num_frames)),
                                                        spec.height, spec.width), "prompt": prompt, "key": key})
                   for p, n, prompt, key in zip(batch["video"], batch["frames"], batch["prompt"], batch["key"])]
        return {name: [s[name] for s in samples] for name in samples[0]}

    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # Stateful: a resumed run continues mid-epoch with the batches an uninterrupted run would see.
        # Its own generator: the loader's per-epoch worker seed must not consume the global RNG that
        # the model's noise draws (restored on resume) come from.
        sampler = ResumableShuffle(len(self.dataset), seed=self.seed)
        generator = torch.Generator().manual_seed(self.seed)
        return StatefulDataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, generator=generator,
                                  num_workers=self.num_workers, collate_fn=self.processor.collate, drop_last=False)
