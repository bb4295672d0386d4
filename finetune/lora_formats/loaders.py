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


# The fields of peft's `LoraConfig` by release (`dataclasses.fields`, read in a venv of each release by
# `bench/compat.py`'s stacks): diffusers >= 0.34 passes a file's `lora_adapter_metadata` to `LoraConfig(**metadata)`
# unfiltered, so a field the installed peft lacks raises TypeError. Each release: its fields beyond the one before.
_PEFT_0_17 = {
    "alpha_pattern", "auto_mapping", "base_model_name_or_path", "bias", "corda_config", "eva_config",
    "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights", "layer_replication", "layers_pattern",
    "layers_to_transform", "loftq_config", "lora_alpha", "lora_bias", "lora_dropout", "megatron_config",
    "megatron_core", "modules_to_save", "peft_type", "qalora_group_size", "r", "rank_pattern", "revision",
    "runtime_config", "target_modules", "target_parameters", "task_type", "trainable_token_indices", "use_dora",
    "use_qalora", "use_rslora"}
PEFT_LORA_FIELDS = {(0, 17): _PEFT_0_17}
PEFT_LORA_FIELDS[(0, 18)] = PEFT_LORA_FIELDS[(0, 17)] | {"alora_invocation_tokens", "arrow_config",
                                                          "ensure_weight_tying", "peft_version"}
PEFT_LORA_FIELDS[(0, 20)] = PEFT_LORA_FIELDS[(0, 18)] | {"lora_ga_config", "monteclora_config", "use_bdlora",
                                                          "velora_config"}
PEFT_LORA_FIELDS[(0, 21)] = PEFT_LORA_FIELDS[(0, 20)] | {"kasa_config"}
# diffusers that never read the header (alpha = rank), and those that read rank_pattern/alpha_pattern from it
# unconditionally (KeyError without them): measured by bench/compat.py (docs/compatibility.md)
READS_HEADER_FROM = (0, 34)
NEEDS_PATTERNS_BEFORE = (0, 36)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", str(text))[:3])


def installed_versions() -> dict[str, str | None]:
    """The diffusers and peft a claim is made for by default: the installed ones (None: not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for package in ("diffusers", "peft"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


def peft_fields(peft_version: str | None) -> set[str] | None:
    """The LoraConfig fields of the newest recorded peft release not after `peft_version` (None: older than any)."""
    if peft_version is None:
        return None
    known = [release for release in PEFT_LORA_FIELDS if release <= version_tuple(peft_version)[:2]]
    return PEFT_LORA_FIELDS[max(known)] if known else None


def describe(path: str | Path | LoraFile, names: LoraNames | None = None, versions: dict | None = None) -> dict:
    """Everything `cogft inspect` prints, as data: layout, rank, alpha and their source, targets, dtypes, tensor
    count, non-finite tensors, and per loader whether it loads the file and at which scale. `path`: a file or folder,
    or a `LoraFile` already read."""
    names = names or LoraNames()
    file = path if isinstance(path, LoraFile) else read_lora_file(path)
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
    versions = {**installed_versions(), **{k: v for k, v in (versions or {}).items() if v}}
    info["versions"] = versions
    info["loaders"] = loader_report(file, layout, names, adapter, versions)
    return info


def _leaf(module: str) -> str:
    """`transformer_blocks.3.attn1.to_q` -> `attn1.to_q` (the target without its block)."""
    return re.sub(r"^.*?\.\d+\.", "", module)


def _one(values):
    values = sorted(set(round(v, 8) for v in values))
    return values[0] if len(values) == 1 else values


def loader_report(file: LoraFile, layout: str, names: LoraNames, adapter: Adapter | None,
                  versions: dict | None = None) -> dict[str, dict]:
    """loader -> {loads: bool, scale: the factor it applies to B @ A (at strength 1), note}, for the diffusers and peft
    of `versions` (default: the installed ones)."""
    versions = versions or installed_versions()
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
    elif prefixed and meta_scale is None:
        report["diffusers"] = {"loads": True, "scale": 1.0, "note": "no lora_adapter_metadata: alpha = rank" + (
            " (finetrainers' lora_config header is not read)" if file.finetrainers_config else "")}
    elif prefixed:
        report["diffusers"] = _header_report(config, meta_scale, versions)
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
    report["comfyui_native"] = _native_report(file, keys, names, rank, adapter)
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


def _header_report(config: dict, meta_scale: float, versions: dict) -> dict:
    """What diffusers `versions["diffusers"]` with peft `versions["peft"]` makes of a file's header (the rules
    above)."""
    diffusers, peft = versions.get("diffusers"), versions.get("peft")
    if diffusers is None:
        return {"loads": False, "scale": None, "note": "diffusers is not installed (name one: --diffusers-version)"}
    if version_tuple(diffusers) < READS_HEADER_FROM:
        return {"loads": True, "scale": 1.0,
                "note": f"diffusers {diffusers} never reads lora_adapter_metadata: alpha = rank"}
    fields = set(config)
    known = peft_fields(peft)
    if known is None:
        return {"loads": None, "scale": None, "note": f"peft {peft}: its LoraConfig fields are not recorded (>= 0.17 "
                                                      f"are); the header may not load"}
    if fields - known:
        return {"loads": False, "scale": None,
                "note": f"diffusers {diffusers} passes the header to LoraConfig: peft {peft} has no "
                        f"{', '.join(sorted(fields - known)[:3])} (TypeError); `cogft convert --to diffusers` writes a "
                        f"header every peft takes"}
    if version_tuple(diffusers) < NEEDS_PATTERNS_BEFORE and not {"rank_pattern", "alpha_pattern"} <= fields:
        return {"loads": False, "scale": None, "note": f"diffusers {diffusers} reads rank_pattern and alpha_pattern "
                                                       f"from the header, which lacks them (KeyError)"}
    return {"loads": True, "scale": meta_scale,
            "note": f"alpha/rank from lora_adapter_metadata (diffusers {diffusers}, peft {peft})"}


def _alpha_key_scale(file: LoraFile, rank) -> dict:
    alphas = [float(v) for k, v in file.tensors.items() if k.endswith(".alpha")]
    if not alphas:
        return {"scale": 1.0}
    alpha = _one(alphas)
    return {"scale": alpha / rank if isinstance(alpha, float) and isinstance(rank, int) else None}


def _native_report(file: LoraFile, keys: list[str], names: LoraNames, rank, adapter: Adapter | None) -> dict:
    """Native ComfyUI's generic LoRA key map (`comfy/lora.py`): for each module `M` of its model (native names) it
    applies the keys `diffusion_model.M.*` and `lora_unet_<M, dots as underscores>.*`, nothing else. Counted per key
    and per module, with the share of the trained update (sum of |delta|^2) that it applies: a partial load says so."""
    if names.modules is None:
        return {"loads": False, "scale": None, "note": "native ComfyUI does not run this model"}
    spelled = {}  # `lora_unet_` stem in native spelling -> our module
    for module in (adapter.modules if adapter else ()):
        native = names.modules.to_theirs(module)
        if native is not None:
            spelled[native.replace(".", "_")] = module

    def applied_to(key: str) -> str | None:
        body = next((key[: -len(s)] for s in SUFFIXES if key.endswith(s)), None)
        if body is None:
            return None
        if body.startswith(names.native_prefix):
            return names.modules.to_ours(body[len(names.native_prefix):])
        if body.startswith("lora_unet_"):
            stem = body[len("lora_unet_"):]
            if adapter is not None:
                return spelled.get(stem)
            dotted = names.modules.from_underscored(stem)  # without the modules: the native spelling only
            return names.modules.to_ours(dotted) if dotted and names.modules.to_theirs(
                names.modules.to_ours(dotted) or "") == dotted else None
        return None

    applied = {key: applied_to(key) for key in keys}
    hit = [key for key, module in applied.items() if module]
    if not hit:
        return {"loads": False, "scale": None, "note": "0 keys with native module names (diffusion_model.blocks.N.*)"}
    modules = {applied[key] for key in hit}
    total = len(adapter.modules) if adapter else len({k.rsplit(".lora_", 1)[0].removesuffix(".alpha") for k in keys})
    report = {"loads": True, **_alpha_key_scale(file, rank), "keys": [len(hit), len(keys)],
              "modules": [len(modules), total], "partial": len(hit) < len(keys)}
    note = f"{len(hit)} of {len(keys)} keys, {len(modules)} of {total} modules"
    if adapter is not None:
        norms = {name: float(m.delta().pow(2).sum()) for name, m in adapter.modules.items()}
        report["fraction"] = sum(norms[m] for m in modules if m in norms) / (sum(norms.values()) or 1.0)
        note += f", {report['fraction']:.1%} of the trained update"
    if report["partial"]:
        note = "PARTIAL: " + note + " (the rest is not applied: write the comfy format, cogft convert --to comfy)"
    return {**report, "note": note + "; .alpha / rank (1.0 without)"}
