"""`cogft inspect` and `cogft convert`: LoRA files, no model loaded (`finetune/lora_formats/files.py` does the work; the
family only says how its module names are spelled elsewhere)."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.families import recognize
from finetune.lora_formats.files import (
    MODEL_KEY,
    LoraFile,
    LoraFileError,
    LoraNames,
    model_record,
    read_lora_file,
    to_adapter,
    trained_record,
)
from finetune.lora_formats.writing import write_adapter
from finetune.lora_formats.loaders import describe

from .config import family_class

LOADERS = {"diffusers": "diffusers load_lora_weights", "kijai_wrapper": "ComfyUI-CogVideoXWrapper",
           "comfyui_native": "ComfyUI (native)", "peft": "PEFT PeftModel.from_pretrained"}


def lora_names(family: str | None):
    return family_class(family).lora_names if family else LoraNames()


def inspect(path: str, family: str | None = None, diffusers: str | None = None, peft: str | None = None) -> dict:
    file = read_lora_file(path)
    source = "--family"
    if family is None:
        family, what = recognize(file)
        source = what if family else f"unknown: {what}"
    info = describe(file, lora_names(family), {"diffusers": diffusers, "peft": peft})
    info["family"] = {"name": family, "source": source}
    info["model_record"] = model_record(file.header)  # what the kit's export says it was trained on (else None)
    if family is None:  # the diffusers/PEFT claims hold for any model; native ComfyUI's depend on it
        info["loaders"]["comfyui_native"] = {"loads": None, "scale": None, "trained_scale": None,
                                             "note": "unknown model (native ComfyUI runs CogVideoX only): --family"}
    return info


def format_report(info: dict) -> str:
    """The report `cogft inspect` prints."""
    def scale(value):
        return "-" if value is None else (f"{value:.4g}" if isinstance(value, float) else str(value))

    lines = [f"file        {info['file']}",
             f"model       {info['family']['name'] or 'unknown'}   from: {info['family']['source']}",
             f"layout      {info['layout']}" + (f" (header: {', '.join(info['header_keys'])})" if info['header_keys']
                                               else ""),
             f"tensors     {info['tensors']} ({', '.join(info['dtypes'])})" + (
                 f", {info.get('modules')} modules" if info.get("modules") else "") + (
                 f", {info['full_tensors']} fully trained tensors (modules_to_save)" if info["full_tensors"] else ""),
             f"rank        {', '.join(map(str, info['ranks'])) or '-'}",
             f"alpha       {', '.join(f'{a:g}' for a in info['alphas']) or '-'}   from: {info['alpha_source']}",
             f"trained     scale alpha/rank = {scale(info['trained_scale'])}" + (
                 f" (trained at rank {info['trained']['rank']}, alpha {info['trained']['alpha']:g}: alpha/rank "
                 f"folded into lora_B)" if info.get("trained") else ""),
             f"targets     {', '.join(info['targets']) or '-'}",
             "finite      " + ("yes" if not info["non_finite"] else
                               f"NO: {len(info['non_finite'])} tensors hold NaN/inf, e.g. {info['non_finite'][0]}"),
             *record_lines(info.get("model_record")),
             "", f"loaders, for diffusers {info['versions'].get('diffusers')} and peft {info['versions'].get('peft')} "
                 f"(--diffusers-version, --peft-version):",
             f"{'loader':34s} {'loads':6s} {'scale':8s} {'x trained':10s} why"]
    for key, entry in info["loaders"].items():
        strength = entry.get("strength")
        loads = {True: "yes", False: "no", None: "?"}[entry["loads"]]
        lines.append(f"{LOADERS[key]:34s} {loads:6s} {scale(entry['scale']):8s} "
                     f"{'-' if strength is None else f'{strength:g}':10s} {entry['note']}")
    return "\n".join(lines)


def record_lines(record: dict | None) -> list[str]:
    """The model record's fields (`finetune.lora_formats.record`), or a note that the file has none."""
    if record is None:
        return [f"record      none: no {MODEL_KEY} in the header (an older kit export or another tool's file); the "
                f"base model it was trained on is not recorded, so generate/merge/adapter_path check it by its names "
                f"and shapes only"]
    base = record.get("base") or {}
    where = (f"{base.get('hub_id')} revision {base.get('revision') or 'unknown'}" if "hub_id" in base else
             f"{base.get('path')} configs sha256 {(base.get('config_sha256') or 'unknown')[:16]}" if base else "-")
    adapter = record.get("adapter") or {}
    settings = ", ".join(f"{k} {adapter[k]}" for k in ("rank", "alpha") if k in adapter)
    return [f"base model  {where}",
            f"family      {record.get('family') or '-'}" + (f" ({record['variant']})" if record.get("variant") else ""),
            f"recipe      {record.get('recipe') or '-'}   global step {record.get('global_step', '-')}",
            f"adapter     {adapter.get('type', '-')}" + (f" ({settings})" if settings else ""),
            f"kit         cog-finetune {record.get('kit_version') or '-'}"]


def convert(source: str, out: str, to: str, family: str | None = None, alpha: float | None = None,
            fold_alpha: bool = False) -> Path:
    file = read_lora_file(source)
    if family is None:
        family, why = recognize(file)
        if family is None and to == "comfy":
            raise LoraFileError(f"--to comfy: which model {source} is for is unknown ({why}); native ComfyUI names "
                                f"exist for CogVideoX only: pass --family cogvideox if it is one.")
    names = lora_names(family)
    if to == "comfy" and names.modules is None:
        raise LoraFileError(f"--to comfy --family {family}: native ComfyUI does not run this model (it runs CogVideoX "
                            f"only), so there are no native names to write; use --to diffusers or kohya, or name the "
                            f"CogVideoX family the LoRA is for (--family cogvideox).")
    adapter = to_adapter(file, names, alpha=alpha)
    # a folded source (the kit's export) keeps its record: its lora_B already holds the trained alpha / rank
    path = write_adapter(adapter, out, to, names, fold=fold_alpha, trained=trained_record(file.header),
                         model=model_record(file.header))
    print(f"{file.path} ({adapter.layout}, rank {sorted(adapter.ranks())}, alpha {sorted(adapter.alphas())} from "
          f"{adapter.alpha_source}) -> {path} ({to}{', alpha folded into lora_B' if fold_alpha else ''})")
    return path


def main_inspect(args) -> dict:
    info = inspect(args.path, args.family, args.diffusers_version, args.peft_version)
    print(json.dumps(info, indent=1) if args.json else format_report(info))
    return info


def main_convert(args) -> Path:
    try:
        return convert(args.source, args.out, args.to, args.family, args.alpha, args.fold_alpha)
    except LoraFileError as err:
        raise SystemExit(f"error: cogft convert: {err}") from None
