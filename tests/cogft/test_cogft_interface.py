"""What `cogft` asks of a family goes through `ModelFamily` (its defaults say clearly what a family cannot do), and
the configs are found through the installed `conf` package."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

import pytest
from conftest import REPO
from PIL import Image

from finetune.cogft import config, models
from finetune.cogft import run as cogft
from finetune.family import GenerationRequest, ModelFamily, Sample


class Bare(ModelFamily):
    """A family with only the required methods."""

    def trainable_module(self):
        return self

    def encode(self, batch):
        return batch

    def training_loss(self, encoded):
        return 0

    def export(self, directory, adapter, record=None):
        return Path(directory)


def test_configs_come_from_the_installed_package(tmp_path, monkeypatch):
    assert config.conf_dir() == Path(str(files("conf"))) == REPO / "conf"
    assert config.recipe_names() == sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))
    assert "cogvlm" in config.model_names()
    (tmp_path / "recipe").mkdir()
    (tmp_path / "recipe" / "mine.yaml").write_text("name: mine\n")
    monkeypatch.setattr(config, "conf_dir", lambda: tmp_path)
    assert config.recipe_names() == ["mine"]  # listed, not a fixed list: a new file is a new recipe


def test_interface_defaults_say_what_the_family_cannot_do(tmp_path):
    family = Bare()
    for call, words in ((lambda: family.merge_loras([("x", 1.0)]), "cannot merge LoRAs"),
                        (lambda: family.save_merged(tmp_path), "cannot save a merged model"),
                        (family.base_checkpoint_dir, "does not say which folder")):
        with pytest.raises(NotImplementedError, match=f"Bare {words}"):
            call()
    assert family.generation_options() == () and Bare.model_card_usage("base", "me/x", []) is None


def test_merge_with_a_family_that_cannot_merge_stops_with_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "build_family", lambda cfg: Bare())
    with pytest.raises(SystemExit, match=r"^error: cogft merge: Bare does not say which folder"):
        cogft(["merge", "--recipe", "cogvideox_lora", "--preset", "tiny", "--lora", "x", "--out", str(tmp_path)])


def test_generation_options_are_the_families_own():
    from recipes.cogview.cogview4 import CogView4
    from recipes.cogvideox.family import CogVideoX
    from recipes.cogvideox.i2v import CogVideoXImageToVideo

    def options(cls):
        return cls.generation_options(object.__new__(cls))

    assert options(CogVideoX) == options(CogVideoXImageToVideo) == ("num_inference_steps", "guidance_scale", "fps")
    assert options(CogView4) == ("num_inference_steps", "guidance_scale")  # no --fps for an image


def test_requests_and_text_samples(tmp_path, capsys):
    assert models.requests([], ["a.png", "b.png"]) == [GenerationRequest("", "a.png"), GenerationRequest("", "b.png")]
    assert models.requests(["p", "q"], ["a.png"]) == [GenerationRequest("p", "a.png"), GenerationRequest("q", "a.png")]
    with pytest.raises(SystemExit, match="give one image, or one per prompt"):
        models.requests(["p", "q", "r"], ["a.png", "b.png"])
    (path,) = models.write_samples([Sample("text", "42", "a.png"), Sample("text", "x y", "b.png")], tmp_path)
    assert path == tmp_path / "predictions.tsv" and path.read_text() == "a.png\t42\nb.png\tx y\n"
    assert capsys.readouterr().out == "a.png\t42\nb.png\tx y\n"


def test_cogvlm_reads_images_and_asks_for_them(tiny_cogvlm, tmp_path):
    from recipes.cogvlm.family import CogVLM, predict_images

    family = CogVLM(path=tiny_cogvlm, dtype="fp32").eval()
    Image.new("RGB", (60, 60), (255, 255, 255)).save(tmp_path / "a.png")
    red = Image.new("RGB", (60, 60), (200, 30, 30))
    samples = family.generate([GenerationRequest("", str(tmp_path / "a.png")), GenerationRequest("red", red)], seed=0)
    assert [(s.kind, s.caption) for s in samples] == [("text", str(tmp_path / "a.png")), ("text", "red")]
    with Image.open(tmp_path / "a.png") as image:
        expected = predict_images(family.model, family.processor, [image.convert("RGB"), red])
    assert [s.data for s in samples] == expected
    assert [s.data for s in family.generate([GenerationRequest("", red)] * 3, seed=0, batch_size=2)] == \
        predict_images(family.model, family.processor, [red] * 3)
    with pytest.raises(SystemExit, match=r"^error: cogft generate: CogVLM reads images: request 0 has none.*--image"):
        cogft(["generate", "--recipe", "cogvlm_captcha_lora", "--preset", "tiny", "--prompt", "CAPTCHA:",
               "--out", str(tmp_path / "out")])
