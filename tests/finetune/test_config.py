"""The shipped configs, without building anything: every composed `_target_` takes the keys it is given (with values
of the types and ranges its signature and `setting_ranges` allow), every model has a tiny preset file per adapter, a
recipe is a few files (the tiny preset one more), and recipes set only what their defaults do not already give."""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
from conftest import REPO, compose
from hydra import compose as compose_with_hydra
from hydra import initialize_config_dir
from hydra.utils import get_method
from omegaconf import OmegaConf

from finetune.module import FinetuneModule
from finetune.settings.check import choice_problems, config_problems

CONF = REPO / "conf"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


RECIPES, MODELS, STRATEGIES, LOGGERS = options("recipe"), options("model"), options("strategy"), options("logger")
PRESET_OVERRIDES = {"real": [], "tiny": ["preset=tiny"]}  # the real-size recipe and its offline demo


def defaults_list(path: Path) -> list:
    return (OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}).get("defaults", [])


def plain(path: Path) -> dict:
    """A YAML file as written: no defaults list, interpolations unresolved."""
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    node.pop("defaults", None)
    return node


# -- every _target_ takes its keys ------------------------------------------------------------------------------

def target_nodes(node, path: str = ""):
    """(config path, node) for each node with a `_target_`, nested ones included."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path or "<root>", node
        for key, value in node.items():
            yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from target_nodes(value, f"{path}[{index}]")


def binding_errors(path: str, node: dict, target=None) -> list[str]:
    """Bind a node's keys to its target's signature (bind_partial for `_partial_`) without calling it."""
    target = target or get_method(node["_target_"])
    signature = inspect.signature(target)
    kwargs = {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
    unknown = [] if takes_any else sorted(set(kwargs) - set(signature.parameters))
    if unknown:
        return [f"{path}.{key}: not an argument of {node.get('_target_', target.__qualname__)}" for key in unknown]
    bind = signature.bind_partial if node.get("_partial_") else signature.bind
    try:
        bind(*node.get("_args_", []), **kwargs)
    except TypeError as error:
        return [f"{path}: {node.get('_target_', target.__qualname__)}: {error}"]
    return []


def config_errors(cfg) -> list[str]:
    container = OmegaConf.to_container(cfg, resolve=False)
    errors = [e for path, node in target_nodes(container) for e in binding_errors(path, node)]
    # finetune/run.py builds FinetuneModule(family=..., adapter=..., optimizer=..., lr_scheduler=..., **cfg.module)
    errors += binding_errors("module", {**container["module"], "_partial_": True}, target=FinetuneModule)
    return errors


def settings_problems(cfg) -> list[str]:
    """What `finetune.settings.check.check_config` (run before anything is built) finds: types, ranges, names; a value
    left for the command line (`data.root: ???` in the real recipes) aside."""
    return [p for p in config_problems(cfg) if "=???: not set" not in p]


@pytest.mark.parametrize("preset", PRESET_OVERRIDES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_binds_to_its_targets(recipe, preset):
    cfg = compose([f"recipe={recipe}", *PRESET_OVERRIDES[preset]])
    assert not config_errors(cfg)
    assert not settings_problems(cfg)
    # Nothing but the strategy and logger groups writes these nodes (no recipe or preset sets or picks them), so
    # every recipe x strategy x logger composition is this one with those two nodes swapped for the group files
    # bound in test_every_strategy_and_logger_binds: the whole product is covered without composing all of it.
    assert OmegaConf.to_container(cfg.strategy) == plain(CONF / "strategy" / "auto.yaml")
    assert OmegaConf.to_container(cfg.logger, resolve=False) == plain(CONF / "logger" / "wandb.yaml")


@pytest.mark.parametrize("option", [f"strategy={s}" for s in STRATEGIES] + [f"logger={name}" for name in LOGGERS])
def test_every_strategy_and_logger_binds(option):
    for preset in PRESET_OVERRIDES.values():
        cfg = compose([f"recipe={RECIPES[0]}", option, *preset])
        assert not config_errors(cfg) and not settings_problems(cfg)


def test_an_unknown_argument_is_named_with_its_config_path():
    cfg = compose(["recipe=cogview4_lora", "+model.bucket_pixel=4096", "+callbacks.stats.every=3"])
    assert config_errors(cfg) == [
        "model.bucket_pixel: not an argument of recipes.cogview.cogview4.CogView4",
        "callbacks.stats.every: not an argument of finetune.callbacks.TrainingStats",
    ]


# -- tiny presets ------------------------------------------------------------------------------------------------

ADAPTERS = options("adapter")


def test_every_model_has_one_tiny_preset_file_per_adapter():
    """preset=tiny loads conf/preset/tiny/<model>/<adapter>.yaml (conf/train.yaml); a model or adapter without one
    would compose without the preset, so each model ships one for every adapter and none is left for a model that is
    gone."""
    assert sorted(p.name for p in (CONF / "preset" / "tiny").iterdir()) == MODELS
    for model in MODELS:
        assert options(f"preset/tiny/{model}") == ADAPTERS, model
        for adapter in ADAPTERS:
            cfg = compose([f"model={model}", f"adapter={adapter}", "preset=tiny"])
            assert cfg.model.path == "tiny" and cfg.trainer.accelerator == "cpu", (model, adapter)


def hydra_compose(overrides: list[str], conf: Path = CONF):
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        return compose_with_hydra(config_name="train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize("preset", PRESET_OVERRIDES)
@pytest.mark.parametrize("recipe", RECIPES)
def test_every_group_choice_of_a_recipe_names_a_config(recipe, preset):
    assert choice_problems(hydra_compose([f"recipe={recipe}", *PRESET_OVERRIDES[preset]]).hydra) == []


def test_a_preset_that_composes_nothing_is_reported(tmp_path):
    """The preset entries of conf/train.yaml are optional (Hydra skips them without a preset): a mistyped preset, or
    one without a file for the model and adapter, would compose nothing, so train.py stops with the problem."""
    assert choice_problems(hydra_compose(["recipe=cogview4_lora", "preset=tinyy"]).hydra) == [
        f"preset=tinyy: no preset/tinyy.yaml in {CONF}; expected one of tiny",
        f"preset@_global_=tinyy/cogview4/lora: no preset/tinyy/cogview4/lora.yaml in {CONF}; expected one of tiny"]
    conf = shutil.copytree(CONF, tmp_path / "conf")
    (conf / "model" / "toy.yaml").write_text("_target_: recipes.cogvideox.family.CogVideoX\n")
    (conf / "recipe" / "toy_lora.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /model: toy\n  - override /data: video\n\nname: toy_lora\n")
    assert choice_problems(hydra_compose(["recipe=toy_lora"], conf).hydra) == []
    assert choice_problems(hydra_compose(["recipe=toy_lora", "preset=tiny"], conf).hydra) == [
        f"preset@_global_=tiny/toy/lora: no preset/tiny/toy/lora.yaml in {conf}; expected a model and adapter that "
        f"preset/tiny/ has a file for"]


def kit_files(overrides: list[str]) -> list[str]:
    """The kit's config files in Hydra's defaults list for `python train.py <overrides>` (Hydra's own aside)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        defaults = GlobalHydra.instance().config_loader().compute_defaults_list("train", overrides, RunMode.RUN)
    files = [d.config_path for d in defaults.defaults if not d.config_path.startswith("hydra/")]
    assert all((CONF / f"{f}.yaml").is_file() for f in files), files
    return files


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_recipe_is_few_files_and_the_tiny_preset_one_more(recipe):
    """A reader knows what a recipe does from a handful of files: preset=tiny adds the one file of the recipe's model
    and adapter (nothing chained through interpolated defaults), and no tiny recipe composes more than 13."""
    for adapter in ([], ["adapter=full"], ["adapter=lora"]):
        real = kit_files([f"recipe={recipe}", *adapter])
        tiny = kit_files([f"recipe={recipe}", *adapter, "preset=tiny"])
        assert tiny[:-1] == real and tiny[-1].startswith("preset/tiny/"), tiny  # exactly one file more, the last
        assert len(tiny) <= 13, tiny


# -- each value set in one place ---------------------------------------------------------------------------------

def leaves(node, prefix: str = "") -> dict:
    """Dotted key -> value for every leaf (a list is one value)."""
    if isinstance(node, dict) and node:
        return {k: v for key, value in node.items() for k, v in leaves(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): node}


def root_choices() -> dict[str, str]:
    """The groups conf/train.yaml picks by default (adapter: lora, optimizer: adamw, ...)."""
    entries = [e for e in defaults_list(CONF / "train.yaml") if isinstance(e, dict)]
    return {k: v for e in entries for k, v in e.items() if v is not None and "@" not in k and " " not in k}


def given_by_defaults(path: Path, choices: dict[str, str]) -> dict:
    """The values a `@package _global_` config's defaults list gives it before its own: the configs it includes
    (with what they include). Its `override /group: option` entries update `choices`."""
    given: dict = {}
    for entry in defaults_list(path):
        if isinstance(entry, str):
            if entry == "_self_":
                continue
            name = entry.split("@")[0]
            included = CONF / f"{name.lstrip('/')}.yaml" if name.startswith("/") else path.parent / f"{name}.yaml"
            given.update(given_by_defaults(included, choices))
            given.update(leaves(plain(included)))
        else:
            for key, option in entry.items():
                if key.startswith("override "):
                    choices[key.split(" ", 1)[1].strip("/")] = option
    return given


def repeated(path: Path, given: dict) -> list[str]:
    return [f"{path.relative_to(REPO)}: {key}: {value!r} is already given"
            for key, value in leaves(plain(path)).items() if key in given and given[key] == value]


RECIPE_FILES = sorted((CONF / "recipe").rglob("*.yaml"))  # the recipes and their shared parts


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: str(p.relative_to(CONF / "recipe")))
def test_recipes_set_only_what_their_groups_do_not(path):
    choices = root_choices()
    included = given_by_defaults(path, choices)
    given = leaves(plain(CONF / "train.yaml"))
    for group, option in choices.items():
        given.update(leaves({group: plain(CONF / group / f"{option}.yaml")}))
    given.update(included)
    assert not repeated(path, given)


def test_recipes_are_headed_by_their_command():
    for recipe in RECIPES:
        assert f"python train.py recipe={recipe}" in (CONF / "recipe" / f"{recipe}.yaml").read_text(), recipe
