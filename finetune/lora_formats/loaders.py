"""What a LoRA file is and how each loader takes it: `describe` (what `cogft inspect` prints) and `loader_report`.

The loaders' rules (docs/lora-formats.md#loaders-rules):
- diffusers `load_lora_weights`: only `transformer.`-prefixed `lora_A/lora_B` keys; alpha from the header's
  `lora_adapter_metadata`, else alpha = rank (scale 1). Other headers (finetrainers' `lora_config`) are not read.
- kijai's ComfyUI-CogVideoXWrapper: a file with `lora_B` keys goes through diffusers (same rules, and any key without
  "lora" in it, e.g. `.alpha`, makes it fail); otherwise kohya keys on the diffusers names
  (`lora_unet_transformer_blocks_0_attn1_to_q.lora_down/lora_up`) with an optional `.alpha` (scale alpha / rank).
- native ComfyUI: native module names (`diffusion_model.blocks.0.q.lora_A/B`, `lora_down/up`, or
  `lora_unet_blocks_0_q`), `W += strength * alpha / rank * B @ A` with alpha from a per-module `.alpha` tensor
  (factor 1.0 without); the header is never read.
- PEFT `PeftModel.from_pretrained`: `adapter_config.json` (r, lora_alpha) next to `adapter_model.safetensors`.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from finetune.lora_formats.files import (
    PEFT_CONFIG,
    PEFT_FILE,
    SUFFIXES,
    Adapter,
    LoraFile,
    LoraFileError,
    LoraNames,
    detect_layout,
    full_tensors,
    read_lora_file,
    to_adapter,
    trained_record,
)


def describe(path: str | Path, names: LoraNames | None = None) -> dict:
    """Everything `cogft inspect` prints, as data: layout, rank, alpha and their source, targets, dtypes, tensor
    count, non-finite tensors, and per loader whether it loads the file and at which scale."""
    names = names or LoraNames()
    file = read_lora_file(path)
    layout = detect_layout(file)
    info = {"file": str(file.path), "layout": layout, "tensors": len(file.tensors),
            "dtypes": sorted({str(v.dtype).removeprefix("torch.") for v in file.tensors.values()}),
            "non_finite": [k for k, v in file.tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()],
            "header_keys": sorted(k for k in file.header if k != "format"), "full_tensors": len(full_tensors(file))}
    record = trained_record(file.header)  # the kit's export: alpha / rank folded into lora_B, the trained values kept
    info["trained"] = None if record is None else {"rank": record["rank"], "alpha": record["alpha"],
                                                   "alpha_folded_into_lora_B": True}
    try:
        adapter = to_adapter(file, names)
        info.update(modules=len(adapter.modules), ranks=sorted(adapter.ranks()), alphas=sorted(adapter.alphas()),
                    alpha_source=adapter.alpha_source, trained_scale=_one(m.scale for m in adapter.modules.values()),
                    targets=sorted({_leaf(n) for n in adapter.modules}))
    except LoraFileError as err:
        adapter = None
        ranks = sorted({int(v.shape[0]) for k, v in file.tensors.items() if "lora_A" in k or "lora_down" in k
                        or ".matrix_A." in k})
        info.update(ranks=ranks, alphas=[], alpha_source=f"unknown: {err}", trained_scale=None, targets=[])
    info["loaders"] = loader_report(file, layout, names, adapter)
    return info


def _leaf(module: str) -> str:
    """`transformer_blocks.3.attn1.to_q` -> `attn1.to_q` (the target without its block)."""
    return re.sub(r"^.*?\.\d+\.", "", module)


def _one(values):
    values = sorted(set(round(v, 8) for v in values))
    return values[0] if len(values) == 1 else values


def loader_report(file: LoraFile, layout: str, names: LoraNames, adapter: Adapter | None) -> dict[str, dict]:
    """loader -> {loads: bool, scale: the factor it applies to B @ A (at strength 1), note}."""
    keys = list(file.tensors)
    rank_of = {k: int(v.shape[0]) for k, v in file.tensors.items()
               if k.endswith((".lora_A.weight", ".lora_down.weight"))}
    rank = _one(rank_of.values()) if rank_of else None
    meta = file.diffusers_metadata
    meta_scale = None
    if meta:
        config = {k.split(".", 1)[1]: v for k, v in meta.items() if "." in k} or meta
        meta_scale = config.get("lora_alpha", config.get("alpha")) / config["r"]
    report = {}
    prefixed = [k for k in keys if k.startswith(names.prefix) and (".lora_A." in k or ".lora_B." in k)]
    without_lora = [k for k in keys if "lora" not in k]
    if without_lora:  # diffusers' lora_state_dict refuses the whole file (verified on 0.42.1)
        report["diffusers"] = {"loads": False, "scale": None,
                               "note": f"load_lora_weights raises: {without_lora[0]!r} has no 'lora' in its name"}
    elif prefixed:
        note = "alpha/rank from lora_adapter_metadata" if meta_scale is not None else (
            "no lora_adapter_metadata: alpha = rank" + (" (finetrainers' lora_config header is not read)"
                                                       if file.finetrainers_config else ""))
        report["diffusers"] = {"loads": True, "scale": meta_scale if meta_scale is not None else 1.0, "note": note}
    else:
        report["diffusers"] = {"loads": False, "scale": None,
                               "note": f"0 keys with the `{names.prefix}` prefix: load_lora_weights drops them"}
    if any(".lora_B." in k for k in keys):
        diffusers = report["diffusers"]
        report["kijai_wrapper"] = {**diffusers, "note": "lora_B keys go through diffusers: " + diffusers["note"]}
    elif layout == "kohya" and names.modules and all(
            names.modules.to_theirs(names.modules.from_underscored(k.removeprefix("lora_unet_").split(".")[0]) or "")
            for k in keys):
        report["kijai_wrapper"] = {"loads": True, **_alpha_key_scale(file, rank),
                                   "note": "kohya keys on the diffusers names, .alpha / rank"}
    else:
        report["kijai_wrapper"] = {"loads": False, "scale": None, "note": "neither lora_B keys nor kohya keys on "
                                                                          "the diffusers names"}
    report["comfyui_native"] = _native_report(file, keys, names, rank)
    if layout in ("peft", "peft-bare") and file.config:
        scale = file.config["lora_alpha"] / file.config["r"]
        loads = layout == "peft" and file.path.name == PEFT_FILE
        report["peft"] = {"loads": loads, "scale": scale if loads else None,
                          "note": f"lora_alpha / r from {PEFT_CONFIG}" if loads else
                          "keys lack `base_model.model.`: PeftModel.from_pretrained loads none (warns: missing keys)"}
    else:
        report["peft"] = {"loads": False, "scale": None, "note": f"needs {PEFT_CONFIG} beside {PEFT_FILE}"}
    trained = None if adapter is None else _one(m.scale for m in adapter.modules.values())
    for entry in report.values():
        entry["trained_scale"] = trained
        if entry["loads"] and trained is not None and isinstance(entry["scale"], float) and isinstance(trained, float):
            entry["strength"] = round(entry["scale"] / trained, 6)  # 1.0: as trained
    return report


def _alpha_key_scale(file: LoraFile, rank) -> dict:
    alphas = [float(v) for k, v in file.tensors.items() if k.endswith(".alpha")]
    if not alphas:
        return {"scale": 1.0}
    alpha = _one(alphas)
    return {"scale": alpha / rank if isinstance(alpha, float) and isinstance(rank, int) else None}


def _native_report(file: LoraFile, keys: list[str], names: LoraNames, rank) -> dict:
    if names.modules is None:
        return {"loads": False, "scale": None, "note": "native ComfyUI does not run this model"}
    native = []
    for key in keys:
        body = key.removeprefix(names.native_prefix) if key.startswith(names.native_prefix) else None
        if body is None and key.startswith("lora_unet_"):
            spelled = names.modules.from_underscored(key.removeprefix("lora_unet_").split(".")[0])
            body = spelled if spelled and names.modules.to_ours(spelled) else None
        elif body is not None:
            module = next((body[: -len(s)] for s in SUFFIXES if body.endswith(s)), None)
            body = body if module and names.modules.to_ours(module) else None
        if body is not None:
            native.append(key)
    if not native:
        return {"loads": False, "scale": None, "note": "0 keys with native module names (diffusion_model.blocks.N.*)"}
    return {"loads": True, **_alpha_key_scale(file, rank),
            "note": f"{len(native)} of {len(keys)} keys on native names; .alpha / rank (1.0 without)"}
