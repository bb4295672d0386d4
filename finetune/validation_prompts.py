"""Validation prompts from the data (`callbacks.samples.prompts` unset): a few of the training data's own captions,
spread over the dataset, and for a family conditioned on an image (image-to-video) each one's conditioning image
(the one the data names for the clip, else the clip's first frame, saved as `run_dir/samples/conditions/NN.png`),
so that the samples show the user's subject rather than a demo's. Named in the log."""

from __future__ import annotations

from pathlib import Path

from lightning.pytorch.utilities import rank_zero_info

from finetune.family import GenerationRequest


def pick(rows: list[dict], count: int) -> list[dict]:
    """`count` rows of distinct captions, evenly spread over the data (the first and the last among them)."""
    distinct = list({row["caption"]: row for row in reversed(rows)}.values())[::-1]  # first row of each caption
    if len(distinct) <= count:
        return distinct
    if count == 1:
        return distinct[:1]
    return [distinct[round(i * (len(distinct) - 1) / (count - 1))] for i in range(count)]


def requests_from_data(datamodule, count: int, run_dir: Path) -> list[GenerationRequest]:
    """The requests of `count` training samples (see the module docstring); [] for a data module that lists no
    captioned samples (`report_rows`)."""
    from finetune.data_report import report_rows

    rows = report_rows(datamodule) if datamodule is not None and count > 0 else None
    if not rows:
        return []
    spec = getattr(datamodule.require_processor(), "spec", None)
    conditioned = bool(getattr(spec, "conditioning_image", False))
    requests = []
    for i, row in enumerate(pick(rows, count)):
        image = None
        if conditioned:
            image = row.get("image")
            if image is None:  # the clip's first frame, as training conditions on it
                from PIL import Image

                image = run_dir / "samples" / "conditions" / f"{i:02d}.png"
                image.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(row["thumbnail"]()).save(image)
                image = str(image)
        requests.append(GenerationRequest(row["caption"], image=image))
    lines = [f"  {Path(row['file']).name}: {row['caption']!r}" + (f" (image {Path(r.image).name})" if r.image else "")
             for row, r in zip(pick(rows, count), requests)]
    rank_zero_info(f"validation prompts: {len(requests)} of the training data's captions (callbacks.samples.prompts "
                   f"is unset):\n" + "\n".join(lines))
    return requests
