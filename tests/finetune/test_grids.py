"""Sample grids: one picture per validation (prompts x frames), an animated GIF of the videos, and at the end a
prompt x step picture of the whole run, built from the files on disk (so a resumed run shows the earlier steps)."""

from __future__ import annotations

import json

import numpy as np
from conftest import compose
from PIL import Image

from finetune.family import Sample
from finetune.grids import LABEL_H, evenly_spaced, progress_grid, tile_size, write_gif, write_progress
from finetune.media import save_samples

SIDE = 16
# frame f of prompt p has the colour COLOURS[p][f]: every tile is told apart by its centre pixel
COLOURS = [[(250, 0, 0), (0, 250, 0), (0, 0, 250)], [(250, 250, 0), (0, 250, 250), (250, 0, 250)]]


def video(colours, side=SIDE):
    return np.stack([np.full((side, side, 3), c, dtype=np.uint8) for c in colours])


def videos(colours=COLOURS, side=SIDE):
    return [Sample("video", video(c, side), f"prompt number {p}", fps=4) for p, c in enumerate(colours)]


def centre(grid: Image.Image, row: int, column: int, tile=(SIDE, SIDE), top=0) -> tuple:
    tw, th = tile
    return grid.getpixel((column * tw + tw // 2, top + row * (LABEL_H + th) + LABEL_H + th // 2))


def close(pixel, colour, tol=6):
    return all(abs(a - b) <= tol for a, b in zip(pixel, colour))


def test_evenly_spaced_frames_take_first_and_last():
    assert evenly_spaced(49, 8) == [0, 7, 14, 21, 27, 34, 41, 48]
    assert evenly_spaced(3, 8) == [0, 1, 2]


def test_the_validation_grid_has_a_row_per_prompt_and_a_column_per_frame(tmp_path):
    directory = tmp_path / "step_000002"
    save_samples(videos(), directory)
    grid = Image.open(directory / "grid.png").convert("RGB")
    assert grid.size == (3 * SIDE, 2 * (LABEL_H + SIDE))
    for p, row in enumerate(COLOURS):
        for f, colour in enumerate(row):
            assert centre(grid, p, f) == colour, (p, f)
    label = np.asarray(grid)[:LABEL_H]  # the prompt is written in the band above its row
    assert label.max() > 100 and (label == 0).any()


def test_images_make_one_column_and_large_tiles_are_downscaled(tmp_path):
    samples = [Sample("image", Image.new("RGB", (512, 384), c), f"image {i}") for i, c in
               enumerate([(200, 10, 10), (10, 10, 200)])]
    save_samples(samples, tmp_path)
    grid = Image.open(tmp_path / "grid.png").convert("RGB")
    assert grid.size == (256, 2 * (LABEL_H + 192))
    assert centre(grid, 0, 0, (256, 192)) == (200, 10, 10) and centre(grid, 1, 0, (256, 192)) == (10, 10, 200)
    assert not (tmp_path / "grid.gif").exists()  # images: no animation


def test_the_grid_gif_plays_every_frame_of_the_stacked_videos(tmp_path):
    samples = videos([[(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 250)], [(0, 0, 250), (0, 250, 0)]])
    path = write_gif(samples, tmp_path / "grid.gif")
    with Image.open(path) as gif:
        assert gif.n_frames == 4 and gif.info["loop"] == 0 and gif.info["duration"] == 250
        assert gif.size == (SIDE, 2 * (LABEL_H + SIDE))
        gif.seek(3)  # the last frame: the longer video's 4th, the shorter one's held last frame
        frame = gif.convert("RGB")
        assert close(centre(frame, 0, 0), (250, 250, 250)) and close(centre(frame, 1, 0), (0, 250, 0))


def test_progress_has_a_column_per_saved_step_including_those_before_a_resume(tmp_path):
    samples_dir = tmp_path / "samples"
    # an earlier process (before the resume) saved steps 1 and 2; nothing of it is in memory now
    for step, shade in [(1, 60), (2, 120)]:
        save_samples([Sample("video", video([(shade, 0, 0)] * 3), "a red ball"),
                      Sample("video", video([(0, shade, 0)] * 3), "a green ball")], samples_dir / f"step_{step:06d}")
    (samples_dir / "step_000003").mkdir()  # a folder without samples (a crash before they were written) is skipped
    broken = samples_dir / "step_000001" / "01.mp4"  # and a video a crash cut short is a blank tile, not an error
    broken.write_bytes(broken.read_bytes()[:100])
    save_samples([Sample("video", video([(250, 0, 0)] * 3), "a red ball"),
                  Sample("video", video([(0, 250, 0)] * 3), "a green ball")], samples_dir / "step_000004")
    path = write_progress(samples_dir)
    assert path == samples_dir / "progress.png"
    grid = Image.open(path).convert("RGB")
    assert grid.size == (3 * SIDE, LABEL_H + 2 * (LABEL_H + SIDE))
    for column, shade in enumerate([60, 120, 250]):  # mp4 round trip: close, not exact
        assert close(centre(grid, 0, column, top=LABEL_H), (shade, 0, 0)), column
        assert close(centre(grid, 1, column, top=LABEL_H), (0, shade, 0) if column else (0, 0, 0)), column
    assert np.asarray(grid)[:LABEL_H].max() > 100  # the step labels
    assert progress_grid(tmp_path / "nothing") is None


def test_progress_of_images_and_a_prompt_added_later(tmp_path):
    save_samples([Sample("image", Image.new("RGB", (SIDE, SIDE), (200, 0, 0)), "one")], tmp_path / "step_000001")
    save_samples([Sample("image", Image.new("RGB", (SIDE, SIDE), (0, 0, 200)), "one"),
                  Sample("image", Image.new("RGB", (SIDE, SIDE), (0, 200, 0)), "two")], tmp_path / "step_000010")
    grid = progress_grid(tmp_path)
    assert grid.size == (2 * SIDE, LABEL_H + 2 * (LABEL_H + SIDE))
    assert centre(grid, 0, 0, top=LABEL_H) == (200, 0, 0) and centre(grid, 0, 1, top=LABEL_H) == (0, 0, 200)
    assert centre(grid, 1, 0, top=LABEL_H) == (0, 0, 0) and centre(grid, 1, 1, top=LABEL_H) == (0, 200, 0)


def test_a_tiny_video_run_writes_and_logs_the_grids(tmp_path, tiny_cogvideox):
    from finetune.run import train

    train(compose(["recipe=cogvideox_lora", "preset=tiny", "logger=wandb", f"run_dir={tmp_path}",
                   "trainer.max_steps=2", "callbacks.samples.every_n_steps=1",
                   "callbacks.samples.generate_kwargs.num_inference_steps=1", "data.demo_count=2"]))
    samples = tmp_path / "samples"
    steps = sorted(p.name for p in samples.glob("step_*"))
    assert steps == ["step_000001", "step_000002"]
    rows = len(json.loads((samples / "step_000002" / "prompts.json").read_text(encoding="utf-8")))
    frames, size = _decoded(samples / "step_000002" / "00.mp4")
    tw, th = tile_size(size)
    for step in steps:
        assert Image.open(samples / step / "grid.png").size == (min(8, frames) * tw, rows * (LABEL_H + th))
        with Image.open(samples / step / "grid.gif") as gif:
            assert gif.n_frames > 1 and gif.size == (tw, rows * (LABEL_H + th))
    assert Image.open(samples / "progress.png").size == (2 * tw, LABEL_H + rows * (LABEL_H + th))
    (run,) = tmp_path.glob("wandb/offline-run-*")
    media = run / "files" / "media"
    assert len(list(media.glob("images/val/grid_*.png"))) == 2
    assert len(list(media.glob("videos/val/grid_video_*.gif"))) == 2
    assert len(list(media.glob("images/val/progress_*.png"))) == 1
    # the run's history, as `wandb sync` would upload it: the quality signals, the baseline and the grids
    history = wandb_history(run)
    for key in ("val/motion", "val/saturation", "val/color_drift", "val/baseline_motion", "val/baseline_saturation"):
        values = [json.loads(v) for v in history.get(key, [])]
        assert values and all(isinstance(v, float) and v == v for v in values), key
    assert len(history["val/motion"]) == 2 and len(history["val/baseline_motion"]) == 1  # each step; the baseline once
    for key in ("val/grid/path", "val/grid_video/path", "val/progress/path"):
        assert key in history, key


def wandb_history(run) -> dict[str, list[str]]:
    """key -> the JSON values logged under it, read from an offline run's `run-*.wandb` file: wandb's record log
    (a 7-byte W&B header, then LevelDB-log blocks of 32 KiB whose chunks -- crc32 4 bytes, length 2, type 1:
    full/first/middle/last -- hold `wandb_internal_pb2.Record` protobufs)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = run.glob("run-*.wandb")
    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    position, records, partial = 7, [], b""
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a chunk header is padding
            position += block - position % block
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        chunk, position = data[position + 7:position + 7 + length], position + 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind in (2, 3):
            partial = (b"" if kind == 2 else partial) + chunk
        elif kind == 4:
            records.append(partial + chunk)
    history: dict[str, list[str]] = {}
    for raw in records:
        record = wandb_internal_pb2.Record.FromString(raw)
        if record.WhichOneof("record_type") == "history":
            for item in record.history.item:
                history.setdefault(item.key or "/".join(item.nested_key), []).append(item.value_json)
    return history


def _decoded(path):
    import av

    with av.open(str(path)) as container:
        decoded = [frame.to_image() for frame in container.decode(video=0)]
    return len(decoded), decoded[0].size


def test_grids_go_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.grids import log_progress
    from finetune.media import log_samples

    board = TensorBoardLogger(str(tmp_path), name="tb", version="")
    directory = tmp_path / "samples" / "step_000001"
    samples = videos()
    log_samples([board], samples, save_samples(samples, directory), step=1)
    log_progress([board], tmp_path / "samples", step=1)
    board.experiment.flush()
    events = EventAccumulator(board.log_dir)
    events.Reload()
    assert set(events.Tags()["images"]) == {"val/grid", "val/progress"}
    (image,) = events.Images("val/grid")
    assert (image.step, image.width, image.height) == (1, 3 * SIDE, 2 * (LABEL_H + SIDE))
