"""The model families the installed configs name (`conf/model/<name>.yaml`), for what works on a file before any
model is chosen: which family a LoRA file is for (`recognize`), from each family's `recognize_lora`."""

from __future__ import annotations

from finetune.console import conf_dir


def model_names() -> list[str]:
    """The configs of `conf/model/`, by listing the installed `conf` package."""
    return sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))


def family_class(name: str):
    """The ModelFamily class `conf/model/<name>.yaml` names (cogvideox, cogview4, ...); KeyError for no such file."""
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise KeyError(name)
    return get_class(OmegaConf.load(path)["_target_"])


def recognize(file) -> tuple[str | None, str]:
    """The model family a LoRA file (`finetune.lora_formats.files.LoraFile`) is for, from its names and shapes
    (`ModelFamily.recognize_lora` of every conf/model/ family): (its conf/model name, what it is) when exactly one kind
    of model claims it, else (None, why not)."""
    shapes = {key: tuple(value.shape) for key, value in file.tensors.items()}
    claims: dict[str, str] = {}
    for name in model_names():
        description = family_class(name).recognize_lora(shapes)
        if description:
            claims.setdefault(description, name)
    if len(claims) == 1:
        return next(iter(claims.values())), next(iter(claims))
    return None, ("claimed by " + " and ".join(sorted(claims)) if claims else
                  "its names and shapes fit no known model (a tiny or unusual model?)") + "; pass --family"


def captioner(model: str, **options):
    """The captioner of the one family that claims `model` (`ModelFamily.captioner`), for `cogft caption`."""
    for name in model_names():
        found = family_class(name).captioner(model, **options)
        if found is not None:
            return found
    raise ValueError(f"no model family captions with {model!r}: use THUDM/cogvlm2-llama3-caption (videos), "
                     f"THUDM/cogvlm2-llama3-chat-19B (images), a local copy of them, or --preset tiny.")
