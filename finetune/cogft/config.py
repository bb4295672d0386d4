"""The kit's configs for the command: a recipe composed as `train.py` composes it (optionally with a preset), and the
family class a `conf/model/<name>.yaml` names."""

from __future__ import annotations

from pathlib import Path


def conf_dir() -> Path:
    """The folder of the installed `conf` package (the kit's configs, package data of cog-finetune)."""
    from finetune.console import conf_dir as installed

    try:
        return installed()
    except ModuleNotFoundError:
        raise SystemExit("the kit's configs (the `conf` package) are not installed: run `pip install -e .` in the "
                         "cog-finetune checkout.") from None


def _names(group: str) -> list[str]:
    """The configs of `conf/<group>/`, by listing the installed package."""
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


def model_names() -> list[str]:
    from finetune.families import model_names as names

    return names()


def recipe_names() -> list[str]:
    return _names("recipe")


def family_class(name: str):
    """The ModelFamily class of `conf/model/<name>.yaml` (cogvideox, cogview4, ...)."""
    from finetune.families import family_class as named

    conf_dir()  # the configs are installed (else: how to install them)
    try:
        return named(name)
    except KeyError:
        raise SystemExit(f"--family {name!r}: no conf/model/{name}.yaml; use one of {', '.join(model_names())}.") \
            from None


def compose_recipe(recipe: str, preset: str | None = None, overrides: list[str] | None = None):
    """The config `python train.py recipe=<recipe> [preset=<preset>] <overrides>` runs."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if recipe not in recipe_names():
        raise SystemExit(f"--recipe {recipe!r}: no conf/recipe/{recipe}.yaml; use one of {', '.join(recipe_names())}.")
    from omegaconf import open_dict

    from finetune.settings.check import ConfigError, check_choices

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"recipe={recipe}"] + ([f"preset={preset}"] if preset else [])
                      + list(overrides or []), return_hydra_config=True)
    try:  # a preset that composed nothing (`--preset tinyy`) stops here, as it stops train.py
        check_choices(cfg.hydra)
    except ConfigError as err:
        raise SystemExit(f"--recipe {recipe} --preset {preset}: {err}") from None
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def build_family(cfg):
    """The model family a composed config names (the model loads here), its checkpoint resolved once, as
    `train.py` builds it (`finetune.run.build_family`)."""
    from finetune.run import build_family as build

    return build(cfg)
