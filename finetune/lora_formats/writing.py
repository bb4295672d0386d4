"""Writing LoRA files: an `Adapter` (`finetune.lora_formats.files`) as the diffusers, native ComfyUI or kohya layout,
with alpha / rank folded into lora_B when asked, and back (`unfold_alpha`). The loaders' rules behind each layout:
docs/lora-formats.md#loaders-rules.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from finetune.lora_formats.files import (
    DIFFUSERS_FILE,
    MODEL_KEY,
    TRAINED_KEY,
    Adapter,
    LoraFileError,
    LoraModule,
    LoraNames,
    _most_common,
    check_finite,
)


def fold_alpha(adapter: Adapter) -> Adapter:
    """`lora_B * alpha / rank` with alpha = rank: the same delta with no alpha to read."""
    modules = {n: LoraModule(m.A, (m.B.float() * m.scale).to(m.B.dtype), float(m.rank))
               for n, m in adapter.modules.items()}
    return Adapter(modules, layout=adapter.layout, alpha_source="folded into lora_B")


def diffusers_tensors(adapter: Adapter, names: LoraNames, fold: bool = False,
                      targets: list[str] | None = None, trained: dict | None = None) -> tuple[dict, dict]:
    """Keys `transformer.<module>.lora_A/B.weight` and a `lora_adapter_metadata` header of the fields every supported
    peft's `LoraConfig` takes (`r`, `lora_alpha`, `target_modules`, `rank_pattern`, `alpha_pattern`).
    `fold`: alpha/rank multiplied into lora_B and the header's alpha set to the rank, so every loader -- diffusers
    0.33, which never reads the header, included -- applies the trained update at strength 1; the trained rank and
    alpha are kept under `TRAINED_KEY`. `targets`: the header's `target_modules` (default: every module's name).
    `trained`: the record of a folded file `adapter` was read from (its lora_B already holds alpha/rank), kept."""
    as_trained = adapter
    adapter = fold_alpha(adapter) if fold else adapter
    tensors = {}
    for module, m in adapter.modules.items():
        tensors[f"{names.prefix}{module}.lora_A.weight"] = m.A
        tensors[f"{names.prefix}{module}.lora_B.weight"] = m.B
    rank = _most_common([m.rank for m in adapter.modules.values()])
    alpha = _most_common([m.alpha for m in adapter.modules.values()])
    # diffusers 0.34-0.35 read `rank_pattern` and `alpha_pattern` from the header unconditionally (KeyError
    # without them, `bench/compat.py`): always written, empty when uniform
    config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(targets or adapter.modules),
              "rank_pattern": {n: m.rank for n, m in adapter.modules.items() if m.rank != rank},
              "alpha_pattern": {n: m.alpha for n, m in adapter.modules.items() if m.alpha != alpha}}
    prefix = names.prefix.rstrip(".")
    header = {"format": "pt",
              "lora_adapter_metadata": json.dumps({f"{prefix}.{k}": v for k, v in config.items()}, indent=2,
                                                  sort_keys=True)}
    if trained is not None:
        header[TRAINED_KEY] = json.dumps(trained, sort_keys=True)
    elif fold:
        trained_rank = _most_common([m.rank for m in as_trained.modules.values()])
        trained_alpha = _most_common([m.alpha for m in as_trained.modules.values()])
        record = {"rank": trained_rank, "alpha": trained_alpha, "lora_B": "multiplied by alpha / rank"}
        patterns = {n: m.alpha for n, m in as_trained.modules.items() if m.alpha != trained_alpha}
        record.update({"alpha_pattern": patterns} if patterns else {})
        header[TRAINED_KEY] = json.dumps(record, sort_keys=True)
    return tensors, header


def unfold_alpha(tensors: dict[str, torch.Tensor], record: dict, rank: int) -> dict[str, torch.Tensor]:
    """The trained tensors of a folded file: each lora_B divided by alpha / rank again (bitwise the trained values when
    alpha / rank is a power of two, e.g. r 128 / alpha 64; else within one fp32 rounding)."""
    patterns = record.get("alpha_pattern", {})
    out = {}
    for key, value in tensors.items():
        if ".lora_B." in key:
            module = key.split(".lora_B.")[0]
            scale = float(patterns.get(module, record["alpha"])) / rank
            value = (value.float() / scale).to(value.dtype)
        out[key] = value
    return out


def native_tensors(adapter: Adapter, names: LoraNames, fold: bool = False) -> dict:
    """Native ComfyUI: `diffusion_model.<native>.lora_A/B.weight` and a per-module `.alpha` (none when folded)."""
    adapter = fold_alpha(adapter) if fold else adapter
    tensors = {}
    for module, m in adapter.modules.items():
        key = f"{names.native_prefix}{names.native(module)}"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = m.A, m.B
        if not fold:
            tensors[f"{key}.alpha"] = torch.tensor(float(m.alpha))
    return tensors


def kohya_name(module: str) -> str:
    return "lora_unet_" + module.replace(".", "_")


def kohya_tensors(adapter: Adapter, fold: bool = False) -> dict:
    """kohya on the network's names: `lora_unet_<module with _>.lora_down/lora_up.weight` and `.alpha`."""
    adapter = fold_alpha(adapter) if fold else adapter
    tensors = {}
    for module, m in adapter.modules.items():
        key = kohya_name(module)
        tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"] = m.A, m.B
        if not fold:
            tensors[f"{key}.alpha"] = torch.tensor(float(m.alpha))
    return tensors


FORMATS = ("diffusers", "comfy", "kohya")
DEFAULT_NAMES = {"diffusers": DIFFUSERS_FILE, "comfy": "comfyui_lora.safetensors", "kohya": "kohya_lora.safetensors"}


def write_adapter(adapter: Adapter, out: str | Path, to: str, names: LoraNames, fold: bool = False,
                  targets: list[str] | None = None, trained: dict | None = None, model: dict | None = None) -> Path:
    """Write `adapter` as `to` (diffusers | comfy | kohya). `out`: a .safetensors path, or a folder (the format's
    usual file name inside). `model`: the kit's record of the base model and the run (`MODEL_KEY`), kept in the
    header of every format. Refuses non-finite tensors."""
    from safetensors.torch import save_file

    if to not in FORMATS:
        raise LoraFileError(f"--to {to!r}: use one of {', '.join(FORMATS)}")
    check_finite({f"{n}.{p}": t for n, m in adapter.modules.items() for p, t in (("A", m.A), ("B", m.B))}, str(out))
    header = {"format": "pt"}
    if to == "diffusers":
        tensors, header = diffusers_tensors(adapter, names, fold, targets, trained)
    elif to == "comfy":
        tensors = native_tensors(adapter, names, fold)
    else:
        tensors = kohya_tensors(adapter, fold)
    if model is not None:
        header[MODEL_KEY] = json.dumps(model, sort_keys=True)
    out = Path(out)
    path = out if out.suffix == ".safetensors" else out / DEFAULT_NAMES[to]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path), metadata=header)
    return path
