"""`cogft caption`: raw demo videos and images -> the kit's layout, which train.py trains on; a killed run resumes
without recaptioning; existing captions are kept unless --overwrite."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from datamodules.demo_images import write_demo_images
from datamodules.demo_videos import write_demo_videos
from finetune.cogft import run as cogft
from recipes.cogvlm.caption import CogVLMCaptioner
from conftest import compose

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """Clips and photos without captions: the demo videos' .mp4 files and the demo images' .png files only."""
    demo = tmp_path_factory.mktemp("demo")
    folder = tmp_path_factory.mktemp("raw")
    shutil.copytree(write_demo_videos(demo / "videos", count=3) / "videos", folder / "clips")
    (folder / "photos").mkdir()
    for png in sorted(write_demo_images(demo / "images", count=2).glob("*.png")):
        shutil.copy(png, folder / "photos" / png.name)
    return folder


def _rows(out: Path) -> dict[str, str]:
    lines = (out / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    return {row["file_name"]: row["prompt"] for row in map(json.loads, lines)}


def _records(out: Path) -> list[dict]:
    """Every record line that parses, in order (a line torn by a kill does not)."""
    records = []
    for path in sorted((out / ".captions").glob("records-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def test_tiny_captions_make_a_layout_train_py_trains_on(raw, tmp_path):
    from finetune.run import train

    out = tmp_path / "captioned"
    summary = cogft(["caption", str(raw), "--out", str(out), "--preset", "tiny", "--batch-size", "2",
                     "--no-progress"])
    assert summary["files"] == summary["captioned"] == 5 and summary["kept"] == 0
    rows, records = _rows(out), _records(out)
    clips = [f"clips/{p.name}" for p in sorted((raw / "clips").iterdir())]
    photos = [f"photos/{p.name}" for p in sorted((raw / "photos").iterdir())]
    assert sorted(r["file_name"] for r in records) == sorted(clips + photos)
    assert {r["model"] for r in records} == {"tiny"}
    # An empty caption (a tiny random model may stop at once) is reported and left out; the rest are in order.
    empty = [r["file_name"] for r in records if not r["prompt"].strip()]
    assert summary["empty"] == sorted(empty) and len(empty) < 3
    assert list(rows) == [n for n in clips + photos if n not in empty]
    assert rows == {r["file_name"]: r["prompt"] for r in records if r["file_name"] in rows}
    videos = (out / "videos.txt").read_text().split()
    assert videos == [n for n in clips if n not in empty] and videos
    assert (out / "prompts.txt").read_text().splitlines() == [rows[n] for n in videos]
    assert all((out / name).is_file() for name in clips + photos)  # the media beside the layout (links or copies)

    run_dir = tmp_path / "run"
    train(compose(["recipe=cogvideox_lora", "preset=tiny", f"data.root={out}", f"run_dir={run_dir}",
                   "trainer.max_steps=2", "callbacks.samples.every_n_steps=0", "logger=csv"]))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_a_killed_run_resumes_without_recaptioning(raw, tmp_path):
    out = tmp_path / "captioned"
    # A real SIGKILL in the middle of the run: on the captioner's second call (the first caption is on disk).
    script = textwrap.dedent(f"""
        import os, signal
        from recipes.cogvlm.caption import CogVLMCaptioner
        from finetune.cogft import run
        calls = []
        original = CogVLMCaptioner.caption_videos
        def caption_videos(self, paths):
            calls.append(paths)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self, paths)
        CogVLMCaptioner.caption_videos = caption_videos
        run(["caption", {str(raw)!r}, "--out", {str(out)!r}, "--preset", "tiny", "--no-progress"])
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    first = _records(out)
    assert [r["file_name"] for r in first] == ["clips/" + sorted(os.listdir(raw / "clips"))[0]]
    assert not (out / "metadata.jsonl").exists()  # the layout is written when a run completes
    with open(out / ".captions" / "records-0.jsonl", "a") as log:
        log.write('{"file_name": "clips/torn')  # a line cut short by a kill mid-write is ignored

    seen = []
    original = CogVLMCaptioner.caption_videos, CogVLMCaptioner.caption_images

    def spy(kind):
        def caption(self, paths):
            seen.extend(Path(p).relative_to(raw).as_posix() for p in paths)
            return original[kind == "image"](self, paths)
        return caption

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(CogVLMCaptioner, "caption_videos", spy("video"))
        patch.setattr(CogVLMCaptioner, "caption_images", spy("image"))
        resumed = cogft(["caption", str(raw), "--out", str(out), "--preset", "tiny", "--no-progress"])
        assert resumed["captioned"] == 4 and resumed["kept"] == 1
        assert first[0]["file_name"] not in seen and len(seen) == 4
        rows = _rows(out)
        assert len(rows) == 5 - len(resumed["empty"]) and rows[first[0]["file_name"]] == first[0]["prompt"]
        assert [r for r in _records(out) if r["file_name"] == first[0]["file_name"]] == first  # not redone

        seen.clear()
        again = cogft(["caption", str(raw), "--out", str(out), "--preset", "tiny", "--no-progress"])
        assert again["captioned"] == 0 and seen == []
        redone = cogft(["caption", str(raw), "--out", str(out), "--preset", "tiny", "--no-progress", "--overwrite"])
        assert redone["captioned"] == 5 and len(seen) == 5
        assert not (out / ".captions" / "overwrite-since").exists()  # the --overwrite completed


def test_existing_captions_are_kept_and_bad_input_is_one_line(tmp_path):
    data = write_demo_videos(tmp_path / "demo", count=2)  # prompts.txt + videos.txt: captioned already
    summary = cogft(["caption", str(data), "--out", str(data), "--preset", "tiny", "--no-progress"])
    assert summary["captioned"] == 0 and summary["kept"] == 2
    assert (data / "prompts.txt").read_text().splitlines()[0].startswith("a ")  # the demo's own caption
    assert _rows(data)[(data / "videos.txt").read_text().split()[0]].startswith("a ")
    with pytest.raises(SystemExit, match="no model family captions with 'someone/else'"):
        cogft(["caption", str(data), "--out", str(tmp_path / "x"), "--model", "someone/else", "--overwrite"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="quantize=nf4 needs a CUDA GPU"):
            cogft(["caption", str(data), "--out", str(data), "--preset", "tiny", "--quantize", "nf4", "--overwrite"])
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(data / (data / "videos.txt").read_text().split()[0], bad / "fine.mp4")
    (bad / "broken.mp4").write_bytes(b"not a video")
    (bad / "broken.png").write_bytes(b"not an image")
    mixed = cogft(["caption", str(bad), "--out", str(tmp_path / "out"), "--preset", "tiny", "--no-progress",
                   "--batch-size", "2"])
    assert sorted(mixed["failed"]) == ["broken.mp4", "broken.png"] and mixed["captioned"] == 1
    assert [r["file_name"] for r in _records(tmp_path / "out")] == ["fine.mp4"]  # the broken ones: tried next time
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no videos"):
        cogft(["caption", str(tmp_path / "empty"), "--out", str(tmp_path / "y")])


def test_processes_share_the_files(raw, tmp_path, monkeypatch):
    """torchrun's RANK / WORLD_SIZE: each process captions its every N-th file of the list, into its own records file,
    the one that ends last writes the whole layout."""
    out = tmp_path / "captioned"
    done = {}
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        done[rank] = cogft(["caption", str(raw), "--out", str(out), "--preset", "tiny", "--no-progress"])
    assert (done[0]["captioned"], done[1]["captioned"]) == (3, 2)
    shards = {rank: [json.loads(line)["file_name"] for line in
                     (out / ".captions" / f"records-{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)}
    everything = sorted(shards[0] + shards[1])
    assert not set(shards[0]) & set(shards[1]) and len(everything) == 5
    assert sorted(_rows(out)) == sorted(n for n in everything if n not in done[1]["empty"])


def test_captioned_photos_train_the_image_recipe(raw, tmp_path):
    from finetune.run import train

    out = tmp_path / "photos"
    cogft(["caption", str(raw / "photos"), "--out", str(out), "--preset", "tiny", "--no-progress"])
    assert not (out / "videos.txt").exists() and len(_rows(out)) == 2 - len(
        [r for r in _records(out) if not r["prompt"].strip()])
    run_dir = tmp_path / "run"
    train(compose(["recipe=cogview4_lora", "preset=tiny", f"data.root={out}", f"run_dir={run_dir}",
                   "trainer.max_steps=1", "callbacks.samples.every_n_steps=0", "logger=csv"]))
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
