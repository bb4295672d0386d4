"""`cogft caption DATA --out DIR`: caption videos and images into the kit's data layout (docs/data.md#captioning).

Every video and image under DATA (any of the layouts the data modules read, or a plain folder) gets a caption from
the captioner of the model family that claims `--model` (`ModelFamily.captioner`: CogVLM2-Caption for videos and
CogVLM2 chat for images by default). DIR receives

- `metadata.jsonl`: one `{"file_name": ..., "prompt": ...}` per file, paths relative to DIR;
- `prompts.txt` / `videos.txt`: the videos again in the CogVideo finetune layout;
- the media themselves (hard links, or copies across file systems) when DIR is not DATA;
- `.captions/records-RANK.jsonl`: every caption the moment it is made (appended, flushed and fsynced), so a run
  that is interrupted or killed resumes where it stopped: a file with a record is never captioned again, unless
  `--overwrite`. Captions DATA already has (its `metadata.jsonl`, or `prompts.txt` + `videos.txt`) are kept too.

Several processes (`torchrun --nproc-per-node N -m finetune.cogft caption ...`) each take every N-th file of the
sorted list and caption those without a caption (RANK, WORLD_SIZE, LOCAL_RANK from the environment) on their own
GPU; each writes its own records file, and each rewrites the layout from all records when it finishes (the last one
to finish writes them all).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from finetune.atomic import atomic_path
from finetune.errors import UserError

VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
RECORDS = ".captions"
DEFAULT_VIDEO_MODEL = "THUDM/cogvlm2-llama3-caption"


def kind_of(name: str) -> str | None:
    suffix = Path(name).suffix.lower()
    return "video" if suffix in VIDEO_SUFFIXES else "image" if suffix in IMAGE_SUFFIXES else None


def find_media(data: Path, exclude: Path | None = None) -> list[str]:
    """Video and image files under `data` (hidden folders and `exclude` skipped), as sorted POSIX paths relative
    to it."""
    found = []
    for path in sorted(data.rglob("*")):
        rel = path.relative_to(data)
        if any(part.startswith(".") for part in rel.parts) or not path.is_file() or kind_of(path.name) is None:
            continue
        if exclude is not None and exclude != data and path.is_relative_to(exclude):
            continue
        found.append(rel.as_posix())
    return found


def existing_captions(data: Path) -> dict[str, str]:
    """The captions DATA's own layout has: `metadata.jsonl` rows (file_name + prompt/caption/text) and the CogVideo
    `prompts.txt` / `videos.txt` pair."""
    captions: dict[str, str] = {}
    videos, prompts = data / "videos.txt", data / "prompts.txt"
    if videos.is_file() and prompts.is_file():
        names = [line.strip() for line in videos.read_text(encoding="utf-8").splitlines() if line.strip()]
        texts = [line.strip() for line in prompts.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(names) == len(texts):
            captions.update(zip(names, texts))
    metadata = data / "metadata.jsonl"
    if metadata.is_file():
        for line in metadata.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            text = next((row[c] for c in ("prompt", "caption", "text") if isinstance(row, dict) and c in row), None)
            if text and "file_name" in row:
                captions[str(row["file_name"])] = text
    return captions


def read_records(out: Path) -> dict[str, dict]:
    """file_name -> its latest record, over every rank's records file; a line cut short by a kill is ignored."""
    records: dict[str, dict] = {}
    for path in sorted((out / RECORDS).glob("records-*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            old = records.get(record.get("file_name"))
            if old is None or record.get("time", 0) >= old.get("time", 0):
                records[record["file_name"]] = record
    return records


def _place(data: Path, out: Path, name: str) -> None:
    target = out / name
    if data == out or target.exists():
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(data / name, target)
    except OSError:
        shutil.copy2(data / name, target)


def write_layout(out: Path, files: list[str], captions: dict[str, str]) -> dict[str, Path]:
    """metadata.jsonl (every captioned file) and prompts.txt / videos.txt (the captioned videos), each atomically."""
    done = [name for name in files if captions.get(name, "").strip()]  # an empty caption trains nothing useful
    written = {}
    rows = "".join(json.dumps({"file_name": n, "prompt": captions[n]}, ensure_ascii=False) + "\n" for n in done)
    videos = [n for n in done if kind_of(n) == "video"]
    contents = {"metadata.jsonl": rows}
    if videos:
        # one caption per line: line breaks inside a caption would shift every later line
        contents["prompts.txt"] = "".join(" ".join(captions[n].split()) + "\n" for n in videos)
        contents["videos.txt"] = "".join(n + "\n" for n in videos)
    for filename, text in contents.items():
        with atomic_path(out / filename) as tmp:
            tmp.write_text(text, encoding="utf-8")
        written[filename] = out / filename
    return written


def caption(data: str, out: str, model: str | None = None, image_model: str | None = None, prompt: str | None = None,
            max_new_tokens: int | None = None, batch_size: int = 1, dtype: str | None = None,
            quantize: str | None = None, overwrite: bool = False, preset: str | None = None,
            progress: bool = True) -> dict:
    """Caption what DATA holds into OUT (module docstring); returns a summary: files, captioned, kept, written."""
    from finetune.families import captioner as find_captioner

    data_dir, out_dir = Path(data).expanduser().resolve(), Path(out).expanduser().resolve()
    if not data_dir.is_dir():
        raise UserError(f"cogft caption: DATA={data} is not a folder. Pass the folder that holds the videos/images.")
    if batch_size < 1:
        raise UserError(f"cogft caption: --batch-size {batch_size}: use 1 or more.")
    if preset not in (None, "tiny"):
        raise UserError(f"cogft caption: --preset {preset}: the only preset is `tiny` (a tiny random captioner).")
    tiny = preset == "tiny"
    files = find_media(data_dir, exclude=out_dir)
    if not files:
        raise UserError(f"cogft caption: no videos ({', '.join(VIDEO_SUFFIXES)}) or images "
                        f"({', '.join(IMAGE_SUFFIXES)}) under {data_dir}.")
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RECORDS).mkdir(exist_ok=True)
    records = read_records(out_dir)
    if overwrite:  # redo everything captioned before this --overwrite began (a resumed --overwrite keeps its own)
        since = _overwrite_mark(out_dir)
        kept = {name: r["prompt"] for name, r in records.items() if r.get("time", 0) >= since}
    else:
        kept = {**existing_captions(data_dir), **{name: r["prompt"] for name, r in records.items()}}
    # The shard is every WORLD_SIZE-th file of the whole list, not of what is left: a process that starts after
    # another one wrote records still gets exactly its own files.
    todo = [name for name in files[rank::world] if name not in kept]
    for name in files:
        _place(data_dir, out_dir, name)

    captioned, failed = 0, {}
    if todo:
        device = None
        if world > 1:
            import torch

            if torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', rank))}"
        captioner = find_captioner(
            "tiny" if tiny and model is None else (model or DEFAULT_VIDEO_MODEL),
            image_model="tiny" if tiny and image_model is None else image_model,
            dtype=dtype or ("fp32" if tiny else "bf16"), quantize=quantize, device=device, prompt=prompt,
            max_new_tokens=max_new_tokens or (8 if tiny else None), batch_size=batch_size)
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="captioning", unit="file", disable=not progress)
        records_file = out_dir / RECORDS / f"records-{rank}.jsonl"
        if records_file.is_file() and records_file.stat().st_size:
            with open(records_file, "rb+") as torn:  # a kill mid-write leaves a line without its newline: end it,
                torn.seek(-1, os.SEEK_END)           # so the next record starts on a line of its own
                if torn.read(1) != b"\n":
                    torn.write(b"\n")
        with open(records_file, "a", encoding="utf-8") as log:
            for kind in ("video", "image"):
                names = [n for n in todo if kind_of(n) == kind]
                run = captioner.caption_videos if kind == "video" else captioner.caption_images
                for start in range(0, len(names), batch_size):
                    batch = names[start:start + batch_size]
                    done = _caption_batch(run, data_dir, batch, failed)
                    for name, text in done:
                        log.write(json.dumps({"file_name": name, "prompt": text, "model": captioner.describe(kind),
                                              "time": time.time()}, ensure_ascii=False) + "\n")
                    log.flush()
                    os.fsync(log.fileno())
                    captioned += len(done)
                    bar.update(len(batch))
        bar.close()
    records = read_records(out_dir)
    captions = {**existing_captions(data_dir), **{n: r["prompt"] for n, r in records.items()}}
    if overwrite and all(records.get(n, {}).get("time", 0) >= since for n in files):
        (out_dir / RECORDS / "overwrite-since").unlink(missing_ok=True)  # this --overwrite is complete
    written = write_layout(out_dir, files, captions)
    empty = [name for name in files if name in captions and not captions[name].strip()]
    summary = {"files": len(files), "captioned": captioned, "kept": len([n for n in files if n in kept]),
               "empty": empty, "failed": failed, "out": str(out_dir),
               "written": {k: str(v) for k, v in written.items()}}
    print(f"cogft caption: {captioned} captioned, {summary['kept']} kept of {len(files)} files -> {out_dir} "
          f"({', '.join(written)})")
    for name, why in list(failed.items())[:5]:
        print(f"cogft caption: skipped {data_dir / name}: {why}")
    if failed:
        print(f"cogft caption: {len(failed)} files could not be captioned (reasons above); fix or remove them and run "
              f"the same command again (it captions only what is missing)")
    if empty:
        print(f"cogft caption: {len(empty)} files got an empty caption and are left out of the layout (first: "
              f"{', '.join(empty[:3])}); caption them again with another --prompt and --overwrite, or write theirs "
              f"into {out_dir / RECORDS}")
    return summary


def _caption_batch(run, data_dir: Path, batch: list[str], failed: dict[str, str]) -> list[tuple[str, str]]:
    """(name, caption) for the files of `batch` that can be read; a file that cannot (not a video/image its decoder
    opens, truncated, unreadable) goes into `failed` with the reason, and the others are captioned without it."""
    try:
        return list(zip(batch, run([str(data_dir / n) for n in batch])))
    except _READ_ERRORS as err:
        if len(batch) == 1:
            failed[batch[0]] = f"{type(err).__name__}: {err}"
            return []
    return [pair for name in batch for pair in _caption_batch(run, data_dir, [name], failed)]


def _read_errors() -> tuple[type, ...]:
    errors: list[type] = [ValueError, OSError, EOFError]
    try:
        import av

        errors.append(av.error.FFmpegError)
    except ImportError:
        pass
    try:
        from PIL import UnidentifiedImageError

        errors.append(UnidentifiedImageError)
    except ImportError:
        pass
    return tuple(errors)


_READ_ERRORS = _read_errors()


def _overwrite_mark(out: Path) -> float:
    """When the current `--overwrite` began: its first run writes the mark, a resumed one reads it, the run that
    completes it removes it."""
    mark = out / RECORDS / "overwrite-since"
    if not mark.is_file():
        with atomic_path(mark) as tmp:
            tmp.write_text(str(time.time()), encoding="utf-8")
    return float(mark.read_text(encoding="utf-8"))
