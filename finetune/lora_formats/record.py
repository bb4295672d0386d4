"""What a LoRA was trained on, and whether it fits the model it is about to be applied to.

The record (`files.MODEL_KEY`, one JSON value in the file's header) has an engine part -- recipe, global step, kit
version, adapter settings (`engine_record`) -- and a model part the family adds (`ModelFamily.base_record`: family,
variant, base model, for which `base_identity` spells the checkpoint). `check_lora_fits` is what `cogft generate`,
`cogft merge` and `adapter_path=` run before applying a file: another family's LoRA is refused (unless forced), and so
is one whose tensors do not fit the model's modules (always: it cannot be applied).

Nothing here knows a model: the family is asked through `finetune.family.ModelFamily` only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import sys
from pathlib import Path
from typing import Callable

from torch import nn

from finetune.lora_formats.files import (
    MODEL_KEY,
    LoraFile,
    LoraFileError,
    detect_layout,
    model_record,
    read_lora_file,
    to_adapter,
)

#: the fields of every record, in the order `cogft inspect` shows them
FIELDS = ("family", "variant", "base", "recipe", "global_step", "adapter", "kit_version")


class LoraMismatch(LoraFileError):
    """A LoRA for another model than this one: the message names both and the override."""


# -- the record ----------------------------------------------------------------------------------
def config_hash(folder: str | os.PathLike) -> str | None:
    """sha256 over a checkpoint folder's config JSONs (`model_index.json`, `*config*.json` at any depth), sorted by
    their relative paths, each path and content hashed: a rebuilt tiny model or another local copy with other configs
    is another base. None: no such folder."""
    root = Path(folder)
    if not root.is_dir():
        return None
    digest = hashlib.sha256()
    files = sorted(p for p in root.rglob("*.json")
                   if p.is_file() and (p.name == "model_index.json" or "config" in p.name))
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def hub_revision(local: str | os.PathLike | None) -> str | None:
    """The commit hash of a Hugging Face cache snapshot folder (`.../models--ORG--NAME/snapshots/<hash>`), else None."""
    if not local:
        return None
    parts = Path(local).resolve().parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--") and \
            re.fullmatch(r"[0-9a-f]{40}", parts[-1]):
        return parts[-1]
    return None


def base_identity(path: str, local: str | os.PathLike | None) -> dict:
    """The base model of `model.path` (resolved to the folder `local`): `{"hub_id", "revision"}` for a hub id (the
    revision the snapshot folder's commit hash, None when `local` is not a hub cache snapshot), else
    `{"path", "config_sha256"}` (a local folder or `tiny`: the path as given, and `config_hash` of the folder)."""
    path = str(path)
    if not Path(path).expanduser().exists() and path.count("/") == 1 and not path.startswith((".", "/", "~")):
        return {"hub_id": path, "revision": hub_revision(local)}
    return {"path": path, "config_sha256": config_hash(local) if local else None}


def adapter_settings(adapter) -> dict:
    """What was trained: the adapter's class and its settings (a LoRA's rank, alpha, targets)."""
    settings = dataclasses.asdict(adapter) if dataclasses.is_dataclass(adapter) else {}
    return {"type": type(adapter).__name__,
            **{k: v for k, v in settings.items() if isinstance(v, (int, float, str, bool, list, type(None)))}}


def engine_record(adapter, recipe: str | None = None, global_step: int | None = None) -> dict:
    """The engine's part of the record: the recipe, the global step, the adapter's settings, the kit's version."""
    from finetune.checkpointing import kit_version

    return {"recipe": recipe, "global_step": global_step, "adapter": adapter_settings(adapter),
            "kit_version": kit_version()}


def describe_base(record: dict) -> str:
    """`CogVideoX (T2V 1.0) on THUDM/CogVideoX-2b@1a2b3c4` for messages."""
    base = record.get("base") or {}
    where = base.get("hub_id") or base.get("path") or "an unrecorded base"
    if base.get("hub_id") and base.get("revision"):
        where += f"@{base['revision'][:12]}"
    elif base.get("config_sha256"):
        where += f" (configs {base['config_sha256'][:12]})"
    variant = f" ({record['variant']})" if record.get("variant") else ""
    return f"{record.get('family') or 'an unknown family'}{variant} on {where}"


# -- does a LoRA fit this model? ---------------------------------------------------------------------
def check_lora_fits(path: str | os.PathLike, family, force: bool = False, override: str = "--force",
                    recognize: Callable[[LoraFile], tuple[str | None, str]] | None = None) -> list[str]:
    """Refuse (`LoraMismatch`) a LoRA file or export folder that is for another model than `family`'s:

    - with the kit's record, its `family` differs from `family.base_record()`'s (`force`: applied anyway, a note);
    - without one, `recognize` (default: every conf/model family's `recognize_lora`, `cogft inspect`'s rule) names
      another family and this one does not claim it (`force`: a note);
    - its LoRA tensors do not fit the trained network's modules (a module it lacks, other in/out sizes): refused
      even with `force`, since nothing could apply it.

    Returns the notes (printed to stderr as well): no record, another variant or base of the same family, forced.
    A path that holds no LoRA file (a full-finetune export) is left to the loader: no notes."""
    try:
        file = read_lora_file(path)
        detect_layout(file)
    except (FileNotFoundError, LoraFileError):
        return []
    ours = family.base_record()
    theirs = model_record(file.header)
    how = f"pass a LoRA trained for {ours.get('family')}, or {override} to apply it anyway"
    notes = []
    if theirs is not None:
        if theirs.get("family") != ours.get("family"):
            what = f"{file.path} is a LoRA for {describe_base(theirs)}; this model is {describe_base(ours)}"
            if not force:
                raise LoraMismatch(f"{what}: {how}.")
            notes.append(f"{what}: applied anyway ({override}).")
        elif (theirs.get("variant"), theirs.get("base")) != (ours.get("variant"), ours.get("base")):
            notes.append(f"{file.path} was trained on {describe_base(theirs)}; this model is {describe_base(ours)}.")
    else:
        if recognize is None:
            from finetune.families import recognize
        shapes = {key: tuple(value.shape) for key, value in file.tensors.items()}
        own = type(family).recognize_lora(shapes)
        other, what_other = (None, "") if own else recognize(file)
        if other is not None:
            what = (f"{file.path} has no {MODEL_KEY} record, and its names and shapes are those of {what_other} "
                    f"({other}); this model is {describe_base(ours)}")
            if not force:
                raise LoraMismatch(f"{what}: {how}.")
            notes.append(f"{what}: applied anyway ({override}).")
        else:
            notes.append(f"{file.path} has no {MODEL_KEY} record (an older kit export or another tool's file): which "
                         f"base it was trained on is unknown; its tensor shapes were checked against this model.")
    misfits, modules = shape_misfits(file, family)
    if misfits:
        raise LoraMismatch(
            f"{file.path}: {len(misfits)} of its {modules} LoRA modules do not fit this model, "
            f"{describe_base(ours)} (e.g. {misfits[0]}); it was trained for "
            f"{describe_base(theirs) if theirs else 'another model'} and cannot be applied, not even with {override}.")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    return notes


def _base_layer(module: nn.Module) -> nn.Module:
    while isinstance(module._modules.get("base_layer"), nn.Module):  # peft's LoraLayer around the base module
        module = module._modules["base_layer"]
    return module


def _io_sizes(module: nn.Module) -> tuple[int, int] | None:
    """(out, in) of a module's weight, as a LoRA's `B @ A` must be (a 4-bit weight is packed: its layer's sizes)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    weight = module._parameters.get("weight")
    if weight is None or weight.dim() < 2:
        return None
    return int(weight.shape[0]), int(weight[0].numel())


def shape_misfits(file: LoraFile, family) -> tuple[list[str], int]:
    """Each LoRA module of the file that the family's trained network lacks or whose `B @ A` is not its weight's
    (out, in), as a phrase; and how many LoRA modules the file has."""
    adapter = to_adapter(file, family.lora_names, alpha=1.0)  # alpha does not change shapes
    network = dict(family.trainable_module().named_modules())
    misfits = []
    for name, lora in adapter.modules.items():
        module = next((network[n] for n in (name, f"base_model.model.{name}") if n in network), None)
        if module is None:
            misfits.append(f"{name}: no such module")
            continue
        sizes = _io_sizes(_base_layer(module))
        got = (int(lora.B.shape[0]), int(lora.A.flatten(1).shape[1]))
        if sizes is not None and sizes != got:
            misfits.append(f"{name}: LoRA {got[0]}x{got[1]}, model {sizes[0]}x{sizes[1]}")
    return misfits, len(adapter.modules)
