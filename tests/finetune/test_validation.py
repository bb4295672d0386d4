"""Bad input stops the run before the model loads: every setting is checked against its target's signature (type,
range, name) before anything is built, LoRA targets against the network's module names on a weightless copy,
and bad data before the weights load; each message names the key, the value and a valid example."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re

import lightning
import pytest
from conftest import REPO, compose
from PIL import Image

import finetune.run
from finetune.data import DataError
from finetune.run import build
from finetune.settings.check import OUTSIDE_RANGES, ConfigError, Range, config_problems, module_problems, ranges_of

RECIPES = sorted(p.stem for p in (REPO / "conf" / "recipe").glob("*.yaml"))


def tiny_cfg(run_dir, *extra, recipe="cogview4_lora"):
    return compose([f"recipe={recipe}", "preset=tiny", "logger=none", f"run_dir={run_dir}", *extra])


def _loaded(what):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran: the bad input was not caught before it")
    return fail


@pytest.fixture
def no_model(monkeypatch):
    """Any attempt to load a model fails the test."""
    from recipes.cogview.cogview4 import CogView4

    monkeypatch.setattr(finetune.run, "build_module", _loaded("build_module"))
    monkeypatch.setattr(CogView4, "__init__", _loaded("CogView4.__init__"))


@pytest.fixture
def nothing_built(no_model, monkeypatch):
    """A config error stops the run before the seed is set and the data is read, too."""
    monkeypatch.setattr(lightning, "seed_everything", _loaded("seed_everything"))
    monkeypatch.setattr(finetune.run, "build_data", _loaded("build_data"))


# -- settings ---------------------------------------------------------------------------------------------------

CASES = {
    "trainer.max_steps=abc": "trainer.max_steps=abc: expected an integer >= 1 or -1, e.g. trainer.max_steps=-1",
    "trainer.max_steps=0": "trainer.max_steps=0: expected an integer >= 1 or -1, e.g. trainer.max_steps=-1",
    "seed=abc": "seed=abc: expected an integer in [0, 4294967295], e.g. seed=42",
    "adapter.rank=0": "adapter.rank=0: expected an integer >= 1, e.g. adapter.rank=128",
    "optimizer.lr=-1": "optimizer.lr=-1: expected a number > 0, e.g. optimizer.lr=0.001",
    "data.batch_size=0": "data.batch_size=0: expected an integer >= 1, e.g. data.batch_size=1",
    "optimizer.betas=[0.9,1.5]": "optimizer.betas=[0.9, 1.5]: expected a list of 2 numbers in [0, 1), "
                                 "e.g. optimizer.betas=[0.9, 0.999]",
    "mode=tset": "mode=tset: expected one of fit, test, e.g. mode=test",
    "trainer.precision=bf16-mixd": "trainer.precision=bf16-mixd: expected one of 64, 32, 16, transformer-engine, "
                                   "transformer-engine-float16, 16-true, 16-mixed, bf16-true, bf16-mixed, 32-true, "
                                   "64-true, bf16 or null, e.g. trainer.precision=bf16-mixed",
    "lr_scheduler.name=cosin": "lr_scheduler.name=cosin: expected one of constant, cosine, "
                               "e.g. lr_scheduler.name=cosine",
    "adapter.target_modules=to_q": "adapter.target_modules=to_q: expected a list of strings or null, "
                                   "e.g. adapter.target_modules=[to_q]",
    "trainer.gradient_clip_val=-1": "trainer.gradient_clip_val=-1: expected a number >= 0 or null, "
                                    "e.g. trainer.gradient_clip_val=0",
    "trainer.limit_val_batches=1.5": "trainer.limit_val_batches=1.5: expected an integer >= 0 or a number in [0, 1] "
                                     "or null, e.g. trainer.limit_val_batches=0",
    "data.on_bad_sample=ignore": "data.on_bad_sample=ignore: expected one of fail, skip, e.g. data.on_bad_sample=fail",
    "+model.checkpoint=/x": "model.checkpoint=/x: not a setting; it is the local folder of model.path, resolved by "
                            "the run: set model.path",
    "+adapter.rnak=8": "adapter.rnak=8: not a setting of finetune.adapters.LoRA; expected one of rank, alpha, "
                       "target_modules, init_lora_weights, dropout, adapter_name, modules, e.g. adapter.rank=8",
}


@pytest.mark.parametrize("override", CASES)
def test_a_bad_setting_stops_the_run_before_anything_is_built(tmp_path, nothing_built, override):
    with pytest.raises(ConfigError) as error:
        build(tiny_cfg(tmp_path, override))
    assert CASES[override] in [line.strip() for line in str(error.value).splitlines()[1:]]


def test_every_problem_is_reported_at_once(tmp_path, nothing_built):
    with pytest.raises(ConfigError) as error:
        build(tiny_cfg(tmp_path, "seed=abc", "adapter.rank=0", "optimizer.lr=-1", "data.batch_size=0",
                       "trainer.max_steps=abc", "module.enable_gradient_checkpointing=3"))
    lines = str(error.value).splitlines()
    assert lines[0] == "the config has 7 problems (nothing was loaded):"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "seed=abc", "adapter.rank=0", "optimizer.lr=-1", "data.batch_size=0", "data.seed=abc",
        "trainer.max_steps=abc", "module.enable_gradient_checkpointing=3"]
    # the data module's seed is the run's: the fix is named where the value comes from
    assert "  data.seed=abc: expected an integer; it is ${seed}: fix seed" in lines


def test_a_required_setting_left_unset_is_named():
    assert config_problems(compose(["recipe=cogview4_lora"])) == [
        "data.root=???: not set; expected a string or null, set data.root=..."]  # null: with data.roots
    assert config_problems(compose([]))[0] == "model=null: no model is chosen; pick a recipe (conf/recipe/), e.g. " \
                                              "recipe=cogview4_lora"


def test_shipped_configs_pass(cache_dir):
    """No false alarm on what the kit ships (every recipe x preset is also checked in test_config.py)."""
    for option in ("strategy=ddp_spawn", "strategy=fsdp", "strategy=deepspeed_zero2", "logger=csv",
                   "logger=tensorboard", "lr_scheduler=cosine", "adapter=full"):
        assert config_problems(compose(["recipe=cogview4_lora", "preset=tiny", option])) == [], option
    # a LoRA recipe's LoRA settings do not fit a full finetune: said before the model loads, not as a TypeError after
    assert config_problems(compose(["recipe=cogvlm_captcha_lora", "adapter=full"]))[0].startswith(
        "adapter.rank=10: not a setting of finetune.adapters.Full; expected one of modules")


def _kit_objects_with_ranges():
    for package in ("finetune", "datamodules", "recipes"):
        for info in pkgutil.walk_packages([str(REPO / package)], prefix=f"{package}."):
            module = importlib.import_module(info.name)
            for value in vars(module).values():
                if getattr(value, "__module__", None) == module.__name__ and "setting_ranges" in vars(value):
                    yield value


def test_every_declared_range_names_a_setting_and_parses():
    ranges_of(object)  # fills OUTSIDE_RANGES
    owners = list(_kit_objects_with_ranges()) + list(OUTSIDE_RANGES)
    assert len(owners) > 8
    for owner in owners:
        parameters = inspect.signature(owner).parameters
        for name, allowed in ranges_of(owner).items():
            assert name in parameters, f"{owner.__qualname__}.setting_ranges: {name} is not a setting"
            assert isinstance(allowed, Range) and allowed.describe()


def test_range_syntax():
    betas = Range("[0, 1)")
    assert betas.contains(0) and betas.contains(0.999) and not betas.contains(1.0)
    steps = Range(">=1 or -1")
    assert steps.contains(5) and steps.contains(-1) and not steps.contains(0)
    batches = Range("int >=0 or float [0, 1]")
    assert batches.contains(20) and batches.contains(0.5) and not batches.contains(1.5)
    assert batches.describe() == "an integer >= 0 or a number in [0, 1]"
    with pytest.raises(ValueError, match="setting range"):
        Range("positive")


# -- LoRA targets and trained modules, by name, before the weights load ----------------------------------------

def network_problems(cfg) -> list[str]:
    """What `build` checks: the adapter's module names against the weightless network of the resolved checkpoint."""
    return module_problems(cfg, finetune.run.trainable_module_names(cfg.model))


def test_unknown_lora_target_is_named_with_valid_names(tmp_path, no_model):
    with pytest.raises(ConfigError) as error:
        build(tiny_cfg(tmp_path, "adapter.target_modules=[to_q,to_kk]"))
    assert ("adapter.target_modules=[to_q, to_kk]: to_kk matches no module of CogView4's trainable network (a target "
            "names a module, or the end of its name after a dot); expected names such as to_k") in str(error.value)
    assert "e.g. adapter.target_modules=[to_q, to_k]" in str(error.value)


@pytest.mark.parametrize("overrides, message", [
    (["adapter.target_modules=[attn1]"],
     r"attn1 matches transformer_blocks.0.attn1 \(Attention\), which LoRA cannot adapt .* such as to_q"),
    (["adapter=full", "adapter.modules=[transformer_blockz]"],
     r"adapter.modules=\[transformer_blockz\]: transformer_blockz is in no module name .*"
     r"e.g. adapter.modules=\[transformer_blocks\]"),
])
def test_modules_that_cannot_be_trained_are_named(cache_dir, overrides, message):
    problems = network_problems(compose(["recipe=cogview4_lora", "preset=tiny", *overrides]))
    assert len(problems) == 1
    assert re.search(message, problems[0]), problems[0]


def test_cogvlm_modules_are_matched_on_a_weightless_model(cache_dir):
    cfg = compose(["recipe=cogvlm_captcha_lora", "preset=tiny", "adapter.modules=[vision.transformer.layer.1.mlp]",
                   "adapter.target_modules=[language_expert_query_key_value,vision_qkv]"])
    problems = network_problems(cfg)
    assert len(problems) == 2
    assert problems[0].startswith("adapter.target_modules=[language_expert_query_key_value, vision_qkv]: vision_qkv "
                                  "matches no module")
    assert "e.g. adapter.modules=[model.vision.transformer.layers.1.mlp]" in problems[1]


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_targets_modules_its_network_has(cache_dir, recipe):
    assert network_problems(compose([f"recipe={recipe}", "preset=tiny"])) == []


def test_the_checkpoint_is_resolved_once_and_handed_to_everything_that_reads_it(tmp_path, monkeypatch):
    """`model.path` (a hub id downloaded, `tiny` built) is resolved once by `build`; the data processor, the module
    name check and the constructor get the local folder; the config keeps the user's value."""
    from recipes.cogview.cogview4 import CogView4

    calls, handed = [], []
    resolve = CogView4.local_checkpoint.__func__

    def counted(cls, path):
        calls.append(path)
        return resolve(cls, path)

    def stop(cfg, checkpoint=None):
        handed.append(checkpoint)
        raise KeyboardInterrupt

    monkeypatch.setattr(CogView4, "local_checkpoint", classmethod(counted))
    monkeypatch.setattr(finetune.run, "build_module", stop)
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        build(cfg)
    assert calls == ["tiny"] and handed == [resolve(CogView4, "tiny")] and cfg.model.path == "tiny"


def test_a_run_checks_its_config_once(tmp_path, monkeypatch):
    checks = []
    real_check = finetune.run.check_config
    monkeypatch.setattr(finetune.run, "check_config", lambda cfg: checks.append(cfg) or real_check(cfg))
    monkeypatch.setattr(finetune.run, "build_data", _loaded("build_data"))
    with pytest.raises(AssertionError, match="build_data ran"):
        finetune.run.train(tiny_cfg(tmp_path))
    assert len(checks) == 1


# -- data: checked in full before the weights load ---------------------------------------------------------------

def test_a_cut_off_image_stops_the_run_before_the_model_loads(tmp_path, no_model):
    from test_image_data import write_folder

    root = write_folder(tmp_path / "data")
    image = tmp_path / "full.jpg"
    Image.effect_noise((64, 64), 80).convert("RGB").save(image, quality=95)
    body = image.read_bytes()
    (root / "1.png").unlink()
    (root / "1.jpg").write_bytes(body[: len(body) // 2])  # the header is intact, half the body is missing
    metadata = root / "metadata.jsonl"
    metadata.write_text(metadata.read_text(encoding="utf-8").replace("1.png", "1.jpg"), encoding="utf-8")
    with pytest.raises(DataError, match=r"(?s)1 bad image\(s\) of 3:.*1\.jpg: not a readable image \(OSError: "
                                        r"image file is truncated.*data.on_bad_sample=skip"):
        build(tiny_cfg(tmp_path / "run", f"data.root={root}"))
