"""`cogft export`, `cogft merge` and `cogft generate`: the model families of `recipes/`, built from the recipe configs
exactly as `train.py` builds them."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from .config import build_family, compose_recipe

MERGE_RECORD = "cogft_merge.json"  # written into every merged model: a second merge is refused


# -- export ----------------------------------------------------------------------------------------
def load_checkpoint(path: Path) -> dict:
    """A training checkpoint as a dict with `state_dict` (and `cogft`, what it was trained for). A file (single
    device, DDP, FSDP with state_dict_type=full) is read with `torch.load(weights_only=True)`; a DeepSpeed folder is
    consolidated with Lightning's converter (needs deepspeed)."""
    if path.is_dir():
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise SystemExit(f"{path} is a folder (a DeepSpeed checkpoint): install deepspeed "
                             f"(`pip install -e '.[deepspeed]'`) to consolidate it.")
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            convert_zero_checkpoint_to_fp32_state_dict(str(path), f"{tmp}/consolidated.ckpt")
            return torch.load(f"{tmp}/consolidated.ckpt", map_location="cpu", weights_only=True)
    if not path.is_file():
        raise SystemExit(f"checkpoint {path}: no such file; pass run_dir/checkpoints/last.ckpt or another .ckpt.")
    from finetune.checkpointing import SafeCheckpointIO

    return SafeCheckpointIO().load_checkpoint(path, map_location="cpu")


def export(ckpt: str, out: str | None = None, config: str | None = None, formats: list[str] | None = None) -> list:
    """The checkpoint's trained weights through the family's own export (diffusers LoRA with metadata, PEFT adapter,
    or the full network for SFT), plus any `formats` it writes (comfy, kohya)."""
    from omegaconf import OmegaConf

    from finetune.checkpointing import identity_differences, run_identity
    from finetune.lora_formats.record import engine_record
    from finetune.run import build_module

    ckpt_path = Path(ckpt).expanduser()
    run_dir = ckpt_path.resolve().parent.parent
    config_path = Path(config) if config else run_dir / "config.yaml"
    if not config_path.is_file():
        raise SystemExit(f"no {config_path}: pass --config with the run's config.yaml (train.py writes it into the "
                         f"run directory).")
    cfg = OmegaConf.load(config_path)
    checkpoint = load_checkpoint(ckpt_path)
    differences = identity_differences(checkpoint.get("cogft", {}), run_identity(cfg))
    if differences:
        raise SystemExit(f"{ckpt_path} was trained for another config than {config_path}: " + "; ".join(differences))
    module = build_module(cfg)
    expected = module.trainable_state_dict()
    state = checkpoint["state_dict"]
    missing = sorted(set(expected) - set(state))
    if missing:
        raise SystemExit(f"{ckpt_path} lacks {len(missing)} trained tensors (e.g. {missing[0]}) of {config_path}'s "
                         f"adapter: pass the config it was trained with (--config).")
    module.load_state_dict(state, strict=False)
    directory = Path(out) if out else run_dir / "export"
    record = engine_record(module.adapter, str(cfg.name), checkpoint.get("global_step"))
    written = [module.family.export(directory, module.adapter, record)]
    for fmt in formats or []:
        if fmt not in module.family.export_formats[:1]:
            written.append(module.family.export_format(directory, module.adapter, fmt, record))
    for path in written:
        print(f"wrote {path}")
    return written


# -- LoRAs with scales -----------------------------------------------------------------------------
def parse_lora(spec: str) -> tuple[str, float]:
    """`PATH` or `PATH:SCALE`."""
    path, _, scale = spec.rpartition(":") if ":" in spec and not Path(spec).exists() else (spec, "", "")
    try:
        return path, float(scale) if scale else 1.0
    except ValueError:
        raise SystemExit(f"--lora {spec!r}: write PATH or PATH:SCALE (e.g. export/:0.8).") from None


def model_overrides(model: str | None, dtype: str | None) -> list[str]:
    return ([f"model.path={model}"] if model else []) + ([f"model.dtype={dtype}"] if dtype else [])


# -- merge -----------------------------------------------------------------------------------------
def check_loras(parsed: list[tuple[str, float]], family, force: bool) -> None:
    """Each LoRA is for this model (`finetune.lora_formats.record.check_lora_fits`): another family's is refused
    unless `--force`; one whose tensors do not fit the model's modules always."""
    from finetune.lora_formats.record import check_lora_fits

    for path, _ in parsed:
        check_lora_fits(path, family, force=force, override="--force")


def merge(recipe: str, loras: list[str], out: str, preset: str | None = None, model: str | None = None,
          dtype: str | None = None, blend_full_modules: bool = False, force: bool = False) -> Path:
    """Base + LoRAs at their scales, saved as a full model: the pipeline in diffusers layout (CogVLM: the HF layout
    with its tokenizer), with `cogft_merge.json` saying what was merged. A scale multiplies the LoRA update; fully
    trained modules come as trained, or at the same scale with `blend_full_modules` (`ModelFamily.merge_loras`)."""
    cfg = compose_recipe(recipe, preset, model_overrides(model, dtype))
    family = build_family(cfg)
    base = family.base_checkpoint_dir()
    if base is not None and (base / MERGE_RECORD).is_file():
        raise SystemExit(f"{base} is already a merged model ({base / MERGE_RECORD}): merging again would add the "
                         f"LoRAs twice. Merge into the original base model (--model) instead.")
    parsed = [parse_lora(spec) for spec in loras]
    if not parsed:
        raise SystemExit("cogft merge: pass at least one --lora PATH[:SCALE].")
    check_loras(parsed, family, force)
    record = family.merge_loras(parsed, blend_full_modules=blend_full_modules)
    out_dir = family.save_merged(Path(out))
    (out_dir / MERGE_RECORD).write_text(json.dumps({"merged": True, "recipe": recipe, "base": cfg.model.path,
                                                    "loras": record}, indent=1))
    print(f"merged {len(record)} LoRA(s) into {cfg.model.path}: {out_dir}")
    return out_dir


# -- generate --------------------------------------------------------------------------------------
def generate(recipe: str, prompts: list[str], out: str, preset: str | None = None, model: str | None = None,
             dtype: str | None = None, loras: list[str] = (), images: list[str] = (), seed: int = 42,
             steps: int | None = None, guidance: float | None = None, height: int | None = None,
             width: int | None = None, frames: int | None = None, fps: int | None = None,
             force: bool = False) -> list[Path]:
    """Videos (text- and image-to-video), images (text-to-image) or captcha readings (CogVLM) from the base model
    with the LoRAs merged at their scales; written under `out`, paths printed."""
    sizes = {"model.height": height, "model.width": width, "model.num_frames": frames}
    overrides = model_overrides(model, dtype) + [f"{k}={v}" for k, v in sizes.items() if v is not None]
    cfg = compose_recipe(recipe, preset, overrides)
    family = build_family(cfg)
    if loras:
        parsed = [parse_lora(spec) for spec in loras]
        check_loras(parsed, family, force)
        family.merge_loras(parsed)
    options = {k: v for k, v in {"num_inference_steps": steps, "guidance_scale": guidance, "fps": fps}.items()
               if v is not None and k in family.generation_options()}
    family.prepare_inference()
    with torch.no_grad():
        samples = family.generate(requests(prompts, images), seed=seed, **options)
    return write_samples(samples, Path(out))


def requests(prompts: list[str], images: list[str]) -> list:
    """One request per prompt with its image (one for all, or one per prompt); without prompts, one per image (a
    family that reads images, CogVLM, asks its own prompt)."""
    from finetune.family import GenerationRequest

    if not prompts:
        return [GenerationRequest("", image) for image in images]
    if len(images) > 1 and len(images) != len(prompts):
        raise SystemExit(f"{len(images)} --image for {len(prompts)} --prompt: give one image, or one per prompt.")
    return [GenerationRequest(p, images[i] if len(images) > 1 else (images[0] if images else None))
            for i, p in enumerate(prompts)]


def write_samples(samples: list, out_dir: Path) -> list[Path]:
    """Videos and images as NN.mp4 / NN.png (`path<TAB>prompt` printed); text (CogVLM's readings) as
    `out/predictions.tsv`, one `image<TAB>answer` line each, printed too."""
    if samples and all(sample.kind == "text" for sample in samples):
        out_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{sample.caption}\t{sample.data}" for sample in samples]
        (out_dir / "predictions.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print("\n".join(lines))
        return [out_dir / "predictions.tsv"]
    from finetune.media import save_samples

    paths = save_samples(samples, out_dir)
    for path, sample in zip(paths, samples):
        print(f"{path}\t{sample.caption}")
    return paths
