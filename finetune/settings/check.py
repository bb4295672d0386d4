"""Every setting checked before anything is built: the constructor signatures are the schema.

`check_config(cfg)` binds each node with a `_target_` (model, adapter, optimizer, lr_scheduler, data, trainer,
strategy, logger, callbacks.*, nested ones too) and `module` (`FinetuneModule`'s settings) to its target's
signature: an unknown key, a value of the wrong type (checked against the parameter's annotation) or out of its
range is reported as `key=value: expected ..., e.g. key=<a valid value>`, all problems of a config at once, before
the seed is set, the data is read or any weight is loaded. Ranges live where the option is defined: the kit's own
classes and functions carry `setting_ranges = {"rank": ">=1", ...}`; targets from elsewhere (torch, Lightning)
have theirs in `OUTSIDE_RANGES` below (the range syntax and the type rules: finetune/settings/types.py).

`check_trainable_modules(cfg, modules)` matches the LoRA targets (`adapter.target_modules` or the family's default)
and the fully trained `adapter.modules` against the module names of the family's trainable network, built on the meta
device from its config alone (`finetune.run.trainable_module_names`: families that offer `trainable_module_names`).
"""

from __future__ import annotations

import difflib
import enum
import inspect
import re
import typing
from pathlib import Path
from typing import Any, Literal

from hydra.utils import get_method
from omegaconf import DictConfig, OmegaConf

from finetune.errors import UserError
from finetune.settings.types import Range, annotations_of, as_text, describe, fits, members


class ConfigError(UserError, ValueError):
    """Settings that cannot work (unknown key, wrong type, out of range), found before anything is built.
    The message lists every problem, one per line, each with the key, the value and a valid example."""


def run_settings(name: str = "run", run_dir: str = "outputs/run", seed: int = 42,
                 mode: Literal["fit", "test"] = "fit", ckpt_path: str | None = None, adapter_path: str | None = None,
                 adapter_force: bool = False, overwrite: bool = False, debug: bool = False,
                 latest_link: str | None = None):
    """The top-level settings of conf/train.yaml (the schema only: top-level keys not named here are not checked,
    the groups are checked against their own targets)."""


# Lightning's `seed_everything` takes a uint32 (outside it warns and seeds 0).
run_settings.setting_ranges = {"seed": "[0, 4294967295]"}


def _outside_ranges() -> dict:
    import lightning.pytorch as pl
    import torch

    adam = {"lr": ">0", "betas": "[0, 1)", "eps": ">0", "weight_decay": ">=0"}
    batches = "int >=0 or float [0, 1]"  # a count of batches, or a fraction of them
    return {
        torch.optim.AdamW: adam,
        torch.optim.Adam: adam,
        torch.optim.SGD: {"lr": ">0", "momentum": ">=0", "dampening": ">=0", "weight_decay": ">=0"},
        pl.Trainer: {
            "devices": ">=1 or -1", "num_nodes": ">=1", "max_steps": ">=1 or -1", "min_steps": ">=0",
            "max_epochs": ">=1 or -1", "min_epochs": ">=0", "accumulate_grad_batches": ">=1",
            "gradient_clip_val": ">=0", "log_every_n_steps": ">=1", "val_check_interval": "int >=1 or float (0, 1]",
            "check_val_every_n_epoch": ">=1", "num_sanity_val_steps": ">=-1", "limit_train_batches": batches,
            "limit_val_batches": batches, "limit_test_batches": batches, "limit_predict_batches": batches,
            "overfit_batches": batches, "fast_dev_run": ">=0", "reload_dataloaders_every_n_epochs": ">=0",
        },
        pl.callbacks.ModelCheckpoint: {"save_top_k": ">=-1", "every_n_train_steps": ">=0", "every_n_epochs": ">=0"},
        pl.strategies.DeepSpeedStrategy: {"stage": "[0, 3]"},
    }


OUTSIDE_RANGES: dict = {}  # filled on first use (imports torch and Lightning)
MISSING = "???"


def ranges_of(target) -> dict[str, Range]:
    """`setting_ranges` of the target (the kit's own) merged over `OUTSIDE_RANGES` (torch, Lightning)."""
    if not OUTSIDE_RANGES:
        OUTSIDE_RANGES.update(_outside_ranges())
    specs = {}
    for base in reversed(getattr(target, "__mro__", (target,))):  # a subclass keeps its base's ranges
        specs.update(OUTSIDE_RANGES.get(base, {}))
    specs.update(getattr(target, "setting_ranges", None) or {})
    return {name: Range(spec) for name, spec in specs.items()}


# -- checking one node ----------------------------------------------------------------------------------------------

def _example(parameter: inspect.Parameter, annotation, allowed: Range | None, value=None):
    """A valid value: the closest choice to `value` when there are choices; `[value]` when a list is wanted; else
    the default when it is one (and not null), else one built from the range or the type."""
    choices = [str(a) for m in members(annotation) if typing.get_origin(m) is Literal for a in typing.get_args(m)]
    close = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.6) if isinstance(value, str) else []
    if close:
        literal = next(a for m in members(annotation) if typing.get_origin(m) is Literal
                       for a in typing.get_args(m) if str(a) == close[0])
        return literal
    if value is not None and not isinstance(value, (list, dict)) and fits([value], annotation, allowed):
        return [value]
    default = parameter.default
    if default is not inspect.Parameter.empty and default is not None:
        default = list(default) if isinstance(default, tuple) else default
        if not isinstance(default, enum.Enum) and fits(default, annotation, allowed):
            return default
    base = next((m for m in members(annotation) if m is not type(None)), annotation)
    if typing.get_origin(base) is Literal:
        return typing.get_args(base)[0]
    if allowed is not None:
        return float(allowed.example()) if base is float else allowed.example()
    return {int: 1, float: 1.0, bool: True, str: "..."}.get(base, "...")


def _eg(where: str, example) -> str:
    return "" if example == "..." else f", e.g. {where}={as_text(example)}"


def check_node(path: str, node: dict, target, partial: bool = False, given_in_code: tuple = (),
               raw: dict | None = None) -> list[str]:
    """The problems of one node's keys against `target`'s signature (unknown keys, missing required ones, types,
    ranges). `raw`: the node unresolved, to say where an interpolated value comes from."""
    problems = []
    origins = {k: v for k, v in (raw or {}).items() if isinstance(v, str) and "${" in v}  # interpolated values
    signature = inspect.signature(target)
    parameters = signature.parameters
    name = node.get("_target_") or f"{target.__module__}.{target.__qualname__}"
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    annotations, allowed = annotations_of(target), ranges_of(target)
    settings = {k: v for k, v in node.items() if not (k.startswith("_") and k.endswith("_"))}
    accepted = [p for p, param in parameters.items() if param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD)]
    for key, value in settings.items():
        where = f"{path}.{key}" if path else key
        if key not in parameters or parameters[key].kind in (inspect.Parameter.VAR_POSITIONAL,
                                                             inspect.Parameter.VAR_KEYWORD):
            if takes_any:
                continue
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = f", e.g. {path + '.' if path else ''}{close[0]}={as_text(value)}" if close else ""
            problems.append(f"{where}={as_text(value)}: not a setting of {name}; expected one of "
                            f"{', '.join(accepted)}{hint}")
            continue
        parameter = parameters[key]
        annotation, bounds = annotations[key], allowed.get(key)
        if parameter.default is None and annotation is not Any:  # `x: int = None` takes null too
            annotation = typing.Optional[annotation]
        if value == MISSING:
            problems.append(f"{where}={MISSING}: not set; expected {describe(annotation, bounds)}"
                            f"{_eg(where, _example(parameter, annotation, bounds)) or f', set {where}=...'}")
        elif not fits(value, annotation, bounds):
            if key in origins:  # the fix belongs where the value comes from
                source = re.fullmatch(r"\$\{([\w.]+)\}", origins[key])
                fix = f"; it is {origins[key]}: fix {source.group(1) if source else 'that'}"
            else:
                fix = _eg(where, _example(parameter, annotation, bounds, value))
            problems.append(f"{where}={as_text(value)}: expected {describe(annotation, bounds)}{fix}")
    if not partial:
        for key, parameter in parameters.items():
            if (parameter.default is inspect.Parameter.empty and key not in settings and key not in given_in_code
                    and parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD)):
                where = f"{path}.{key}" if path else key
                problems.append(f"{where}: not set; {name} requires {describe(annotations[key], allowed.get(key))}"
                                f"{_eg(where, _example(parameter, annotations[key], allowed.get(key)))}")
    return problems


# -- the whole config -----------------------------------------------------------------------------------------------

def target_nodes(node, path: str = ""):
    """(config path, node) for each node with a `_target_`, nested ones included."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield path, node
        for key, value in node.items():
            yield from target_nodes(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from target_nodes(value, f"{path}[{index}]")


def _at(node, path: str):
    """The node at a `target_nodes` path (`callbacks.samples`, `x[0]`), or None."""
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", path):
        if part.startswith("["):
            node = node[int(part[1:-1])] if isinstance(node, list) and int(part[1:-1]) < len(node) else None
        else:
            node = node.get(part) if isinstance(node, dict) else None
    return node if isinstance(node, dict) else None


# Arguments finetune/run.py passes in code, next to the config's.
GIVEN_IN_CODE = {"trainer": ("default_root_dir", "strategy", "callbacks", "logger")}
# ... of which these must not be set in the config: the run sets them from other settings.
SET_BY_THE_RUN = {"model": {"checkpoint": "the local folder of model.path, resolved by the run: set model.path"}}


def config_problems(cfg: DictConfig) -> list[str]:
    """Every problem of a composed config, one line each (empty: nothing to report)."""
    from finetune.module import FinetuneModule

    try:
        container = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
    except Exception as err:  # an interpolation that cannot be resolved
        return [f"{type(err).__name__}: {str(err).splitlines()[0]}"]
    raw = OmegaConf.to_container(cfg, resolve=False)
    top = {k: v for k, v in container.items() if k in inspect.signature(run_settings).parameters}
    problems = check_node("", top, run_settings, partial=True, raw=raw)
    problems += [f"{group}=null: no {group} is chosen; pick a recipe (conf/recipe/), e.g. recipe=cogview4_lora"
                 for group in ("model", "data") if container.get(group) is None]
    for path, node in target_nodes(container):
        try:
            target = get_method(node["_target_"])
        except Exception as err:
            problems.append(f"{path}._target_={node['_target_']}: cannot be imported ({type(err).__name__}); "
                            f"check the name (module.Class)")
            continue
        problems += check_node(path, node, target, partial=bool(node.get("_partial_")),
                               given_in_code=GIVEN_IN_CODE.get(path, ()), raw=_at(raw, path))
        problems += [f"{path}.{key}={as_text(node[key])}: not a setting; it is {why}"
                     for key, why in SET_BY_THE_RUN.get(path, {}).items() if key in node]
    if isinstance(container.get("module"), dict):  # FinetuneModule(family=..., adapter=..., ..., **cfg.module)
        problems += check_node("module", container["module"], FinetuneModule, partial=True, raw=raw.get("module"))
    return problems


def check_config(cfg: DictConfig) -> None:
    """Raise a `ConfigError` naming every problem of the config; nothing has been built yet."""
    problems = config_problems(cfg)
    if problems:
        raise ConfigError(_report(problems, "the config"))


def choice_problems(hydra_cfg) -> list[str]:
    """The group choices of a composition (Hydra's `hydra.runtime`) that name no config file or folder: Hydra
    composes nothing for an `optional` defaults entry whose file is missing, and conf/train.yaml's two preset entries
    are optional (`preset` names the preset, `preset@_global_` loads conf/preset/<preset>/<model>/<adapter>.yaml),
    so `preset=tinyy`, or a preset without a file for the recipe's model and adapter, would run without it."""
    folders = [_source_folder(s) for s in hydra_cfg.runtime.config_sources if s["provider"] == "main"]
    folders = [f for f in folders if f is not None]
    problems = []
    for key, value in hydra_cfg.runtime.choices.items():
        group = key.split("@")[0]
        if value is None or "None" in value.split("/") or group.split("/")[0] == "hydra":
            continue  # not chosen (an interpolated choice of a null group, e.g. no preset, reads None)
        if not any((f / group / f"{value}.yaml").is_file() or (f / group / value).is_dir() for f in folders):
            top = value.split("/")[0]
            known = sorted({p.stem for f in folders for p in (f / group).glob("*")
                            if p.suffix == ".yaml" or p.is_dir()})
            hint = (f"one of {', '.join(known)}" if not any((f / group / top).is_dir() for f in folders)
                    else f"a model and adapter that {group}/{top}/ has a file for")
            where = ", ".join(map(str, folders))
            problems.append(f"{key}={value}: no {group}/{value}.yaml in {where}; expected {hint}")
    return problems


def _source_folder(source) -> Path | None:
    """The folder of a config source: `file://DIR` (train.py in a checkout) or `pkg://conf` (`cogft train`, the
    installed package)."""
    if source["schema"] == "file":
        return Path(source["path"])
    if source["schema"] == "pkg":
        from importlib.resources import files

        return Path(str(files(source["path"])))
    return None


def check_choices(hydra_cfg) -> None:
    """Raise a `ConfigError` naming every group choice that composed nothing (`choice_problems`)."""
    problems = choice_problems(hydra_cfg)
    if problems:
        raise ConfigError(_report(problems, "the config"))


def _report(problems: list[str], what: str) -> str:
    return (f"{what} has {len(problems)} problem{'s' if len(problems) > 1 else ''} (nothing was loaded):\n  "
            + "\n  ".join(problems))


# -- LoRA targets and trained modules -------------------------------------------------------------------------------

# Layers peft's LoRA can adapt (peft.tuners.lora.model dispatchers): a target matching only other modules fails
# in `add_adapter`.
LORA_LAYERS = {"Linear", "Conv1d", "Conv2d", "Conv3d", "Embedding", "Conv1D", "MultiheadAttention",
               "LoRACompatibleLinear", "LoRACompatibleConv", "NonDynamicallyQuantizableLinear"}


def peft_matches(name: str, target: str) -> bool:
    """How peft matches a list entry of `target_modules` (peft.tuners.tuners_utils.check_target_module_exists)."""
    return name == target or name.endswith("." + target)


def _short_names(modules: dict[str, str], lora: bool) -> list[str]:
    """Distinct target names that would work, most common first (`to_q`, `to_out.0`, `proj_out`, ...)."""
    counts: dict[str, int] = {}
    for name, kind in modules.items():
        if lora and kind not in LORA_LAYERS:
            continue
        parts = name.split(".")
        short = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        counts[short] = counts.get(short, 0) + 1
    return sorted(counts, key=lambda s: -counts[s])


def _closest(wrong: str, names: list[str]) -> list[str]:
    return difflib.get_close_matches(wrong, names, n=3, cutoff=0.5)


def _such_as(wrong: str, names: list[str]) -> str:
    shown = list(dict.fromkeys(_closest(wrong, names) + names))[:8]
    return ", ".join(shown) + (", ..." if len(names) > len(shown) else "")


def _fixed(entries: list[str], bad: set[str], names: list[str]) -> list[str]:
    """`entries` with each bad one replaced by its closest valid name (or dropped)."""
    fixed = [(_closest(e, names) or [None])[0] if e in bad else e for e in entries]
    return list(dict.fromkeys(e for e in fixed if e)) or names[:1]


def module_problems(cfg: DictConfig, modules: dict[str, str] | None) -> list[str]:
    """The LoRA targets (`adapter.target_modules`, or the family's default) and the `adapter.modules` entries that
    match nothing in `modules`, the family's trainable network (qualified name -> class name, from a weightless copy
    of it; None: nothing to check against)."""
    from finetune.adapters import LoRA

    family = get_method(cfg.model._target_)
    if not modules:
        return []
    adapter = OmegaConf.to_container(cfg.adapter, resolve=True)
    network = f"{family.__name__}'s trainable network"
    problems = []
    kind = get_method(adapter["_target_"])
    if inspect.isclass(kind) and issubclass(kind, LoRA):
        given = adapter.get("target_modules")
        targets = list(given or family.lora_target_modules or ())
        key = f"adapter.target_modules={as_text(given)}" if given else \
            f"adapter.target_modules=null ({family.__name__}.lora_target_modules={as_text(targets)})"
        lora_names = _short_names(modules, lora=True)
        missing = [t for t in targets if not any(peft_matches(name, t) for name in modules)]
        for target in missing:
            problems.append(f"{key}: {target} matches no module of {network} (a target names a module, or the end "
                            f"of its name after a dot); expected names such as {_such_as(target, lora_names)}, e.g. "
                            f"adapter.target_modules={as_text(_fixed(targets, set(missing), lora_names))}")
        for target in (t for t in targets if t not in missing):
            found = [name for name in modules if peft_matches(name, target)]
            if not any(modules[name] in LORA_LAYERS for name in found):
                inner = [n.removeprefix(found[0] + ".") for n in modules if n.startswith(found[0] + ".")
                         and modules[n] in LORA_LAYERS]
                problems.append(f"{key}: {target} matches {found[0]} ({modules[found[0]]}), which LoRA cannot adapt "
                                f"(it adapts Linear, Conv and Embedding layers); expected names such as "
                                f"{_such_as(target, inner or lora_names)}")
    entries = list(adapter.get("modules") or [])
    all_names = list(modules)
    missing = [e for e in entries if not any(e in name for name in modules)]
    fixed = as_text(_fixed(entries, set(missing), all_names))
    for entry in missing:
        problems.append(f"adapter.modules={as_text(entries)}: {entry} is in no module name of {network} (an entry "
                        f"matches every module whose name contains it); expected (parts of) names such as "
                        f"{_such_as(entry, all_names)}, e.g. adapter.modules={fixed}")
    return problems


def check_trainable_modules(cfg: DictConfig, modules: dict[str, str] | None) -> None:
    """Raise a `ConfigError` if a LoRA target or `adapter.modules` entry matches nothing in `modules` (the trainable
    network's module names, before weights load)."""
    problems = module_problems(cfg, modules)
    if problems:
        raise ConfigError(_report(problems, "the adapter"))
