"""What kohya / ai-toolkit users look for in a dataset, each with its effect on the encoded cache's keys: a trigger
word (`data.trigger`), several roots with repeats (`data.roots`), caption dropout (`data.caption_dropout`, the empty
prompt encoded once)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from datamodules.images import ImageDataModule
from datamodules.textfiles import DataError
from finetune.cache import EncodedCache, precompute
from finetune.data import ImageSpec, Processor
from finetune.dropout import EMPTY_PROMPT_KEY, CaptionDropout

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TINY = ImageSpec(pixels=4096, min_side=32, max_side=64, multiple=32, max_pixels=4096)


def folder(root: Path, captions: list[str]) -> Path:
    root.mkdir(parents=True)
    with open(root / "metadata.jsonl", "w") as f:
        for i, caption in enumerate(captions):
            Image.new("RGB", (64, 64), (30 * i, 120, 200)).save(root / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "prompt": caption}) + "\n")
    return root


def images(**kw) -> ImageDataModule:
    data = ImageDataModule(**kw)
    data.connect(Processor(TINY))
    return data


def test_trigger_prefixes_every_caption_and_changes_the_keys(tmp_path):
    root = folder(tmp_path / "a", ["a dog on grass", "sks, a dog asleep"])
    plain = images(root=str(root)).check()
    triggered = images(root=str(root), trigger="sks").check()
    assert triggered["prompt"] == ["sks, a dog on grass", "sks, a dog asleep"]  # one already starts with it
    assert triggered["key"][0] != plain["key"][0]  # a new caption: encoded again
    assert triggered["key"][1] == plain["key"][1]  # the caption it already had: the same entry


def test_roots_with_repeats_list_each_sample_that_often_and_encode_it_once(tmp_path):
    a = folder(tmp_path / "a", ["one", "two"])
    b = folder(tmp_path / "b", ["three"])
    data = images(root=None, roots=[{"root": str(a), "repeats": 3}, {"root": str(b)}])
    table = data.check()
    assert table["prompt"] == ["one", "two"] * 3 + ["three"]
    alone = images(root=str(a)).check()["key"]
    assert table["key"][:6] == alone * 3  # a repeat is the same sample: the same cache key
    data.setup("fit")
    encoded = []

    def encode(batch):
        encoded.extend(batch["key"])
        return {"x": batch["image"].mean(dim=(1, 2, 3))}

    cache = EncodedCache(tmp_path / "cache", "test")
    assert precompute(cache, data, encode, progress=False) == 3 and sorted(encoded) == sorted(set(table["key"]))
    with pytest.raises(DataError, match=r"data.roots\[1\].repeats=0: a whole number >= 1"):
        images(root=None, roots=[{"root": str(a)}, {"root": str(b), "repeats": 0}]).check()
    with pytest.raises(DataError, match="data.root=.* and data.roots are both set"):
        images(root=str(a), roots=[{"root": str(b)}]).check()
    with pytest.raises(DataError, match="data.root is null and data.roots is not set"):
        images(root=None).check()


def test_caption_dropout_draws_per_step_and_replaces_the_prompt_encodings():
    dropout = CaptionDropout(0.25, ("prompt_embeds",), seed=7)
    draws = torch.stack([dropout.mask(8, step) for step in range(400)])
    assert abs(draws.float().mean().item() - 0.25) < 0.03  # the asked fraction
    assert torch.equal(draws[5], CaptionDropout(0.25, ("prompt_embeds",), seed=7).mask(8, 5))  # resumable
    dropout.empty = {"prompt_embeds": torch.full((3, 2), -1.0)}
    step = next(s for s in range(400) if draws[s].any() and not draws[s].all())
    encoded = {"prompt_embeds": torch.arange(48.0).view(8, 3, 2), "latent": torch.ones(8, 4)}
    out = dropout.drop_encoded(encoded, step)
    for i, dropped in enumerate(draws[step].tolist()):
        expected = torch.full((3, 2), -1.0) if dropped else encoded["prompt_embeds"][i]
        assert torch.equal(out["prompt_embeds"][i], expected)
    assert torch.equal(out["latent"], encoded["latent"])
    assert dropout.drop_prompts({"prompt": [f"p{i}" for i in range(8)]}, step)["prompt"] == \
        ["" if d else f"p{i}" for i, d in enumerate(draws[step].tolist())]
    with pytest.raises(DataError, match="names no prompt encodings"):
        CaptionDropout(0.1, (), seed=0)
    with pytest.raises(DataError, match=r"data.caption_dropout=1.5: a fraction in \[0, 1\)"):
        images(root="demo", caption_dropout=1.5).check()


# 4 steps of the tiny CogVideoX LoRA with data.caption_dropout=0.5 (recipe_losses: the golden test's path); without
# dropout the same run gives test_golden's cogvideox_lora numbers
DROPOUT_GOLDEN = [1.791773, 1.451637, 1.750637, 1.923966]


def test_caption_dropout_golden_cached_equals_uncached(tmp_path, tiny_cogvideox, monkeypatch):
    from test_golden import GOLDEN, recipe_losses

    monkeypatch.setenv("COGFT_CACHE", str(tmp_path / "cache"))
    cached = recipe_losses("cogvideox_lora", tmp_path / "a", "data.caption_dropout=0.5", "data.demo_count=8")
    torch.testing.assert_close(torch.tensor(cached), torch.tensor(DROPOUT_GOLDEN), rtol=1e-4, atol=1e-5)
    assert cached != GOLDEN["cogvideox_lora"]  # samples were dropped
    entries = [json.loads(_metadata(p))["key"] for p in (tmp_path / "cache" / "encoded").rglob("*.safetensors")]
    # the 8 demo clips under their usual keys, and the empty prompt once
    assert len(entries) == 9 and entries.count(EMPTY_PROMPT_KEY) == 1
    # encoding every step, the dropped samples' prompts are "" before the text encoder: the same losses
    uncached = recipe_losses("cogvideox_lora", tmp_path / "b", "data.caption_dropout=0.5", "module.cache=off")
    torch.testing.assert_close(torch.tensor(uncached), torch.tensor(cached), rtol=1e-5, atol=1e-6)


def _metadata(path: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return json.dumps(f.metadata())


def test_roots_from_the_command_line(tmp_path):
    from conftest import compose

    from finetune.run import build_data
    from finetune.settings.check import check_config

    a, b = folder(tmp_path / "a", ["one", "two"]), folder(tmp_path / "b", ["three"])
    cfg = compose(["recipe=cogview4_lora", "preset=tiny", "data.root=null", "data.trigger=sks",
                   f"data.roots=[{{root:{a},repeats:2}},{{root:{b}}}]"])
    check_config(cfg)
    data = build_data(cfg)
    assert data.report.samples == 5 and [r["caption"] for r in data.report_rows()][-1] == "sks, three"
