"""`cogft push`: an adapter and its model card to the Hugging Face Hub. The files are staged in one folder first;
`--dry-run DIR` stages into DIR and stops, so what it writes is exactly what an upload sends."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

ADAPTER_FILES = ("*.safetensors", "adapter_config.json")
MEDIA = ("*.mp4", "*.png", "*.gif", "*.jpg")


def stage(adapter_dir: Path, target: Path, repo_id: str) -> list[Path]:
    """Copy the adapter, the run's resolved config and its latest samples into `target`, and write README.md."""
    from omegaconf import OmegaConf

    adapter_dir = adapter_dir.expanduser()
    files = sorted(f for pattern in ADAPTER_FILES for f in adapter_dir.glob(pattern))
    if not any(f.suffix == ".safetensors" for f in files):
        raise SystemExit(f"{adapter_dir} holds no adapter (.safetensors): pass a run's export folder.")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for file in files:
        shutil.copy2(file, target / file.name)
        written.append(target / file.name)
    run_dir = adapter_dir.resolve().parent
    cfg = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if cfg is not None:
        (target / "training_config.yaml").write_text(OmegaConf.to_yaml(cfg))
        written.append(target / "training_config.yaml")
    steps = sorted((run_dir / "samples").glob("step_*"))
    media = sorted(f for pattern in MEDIA for f in steps[-1].glob(pattern)) if steps else []
    if media:
        (target / "samples").mkdir(exist_ok=True)
        for file in media:
            shutil.copy2(file, target / "samples" / file.name)
            written.append(target / "samples" / file.name)
    card = model_card(repo_id, cfg, [f.name for f in files], [f"samples/{m.name}" for m in media])
    (target / "README.md").write_text(card, encoding="utf-8")
    return [target / "README.md", *written]


def model_card(repo_id: str, cfg, files: list[str], media: list[str]) -> str:
    from hydra.utils import get_class
    from omegaconf import OmegaConf

    model = OmegaConf.to_container(cfg.model, resolve=True) if cfg is not None else {}
    base = str(model.get("path", "BASE_MODEL"))
    hub_base = base.count("/") == 1 and not base.startswith((".", "/", "~"))
    family = get_class(model["_target_"]) if model.get("_target_") else None
    peft = "adapter_config.json" in files
    recipe = str(cfg.name) if cfg is not None else "unknown"
    adapter = OmegaConf.to_container(cfg.adapter, resolve=True) if cfg is not None else {}
    data = OmegaConf.to_container(cfg.data, resolve=True) if cfg is not None and cfg.get("data") else {}
    front = ["---", *([f"base_model: {base}"] if hub_base else []), f"library_name: {'peft' if peft else 'diffusers'}",
             "tags:", "- lora", "- cog-finetune", f"- {recipe}", "---", ""]
    lines = [f"# {repo_id.split('/')[-1]}", "",
             f"A LoRA for `{base}` trained with cog-finetune, recipe `{recipe}`.", "",
             "## Training", "",
             f"- base model: `{base}`", f"- recipe: `{recipe}` (the full resolved config: `training_config.yaml`)",
             f"- adapter: rank {adapter.get('rank')}, alpha {adapter.get('alpha')}, targets "
             f"{adapter.get('target_modules') or 'the recipe default'}",
             f"- data: `{data.get('root', data.get('hf_dataset', 'see training_config.yaml'))}`",
             f"- steps: {cfg.trainer.get('max_steps') if cfg is not None else '?'}", ""]
    if media:
        lines += ["## Samples", ""] + [f"- [{m}]({m})" if m.endswith(".mp4") else f"![{m}]({m})" for m in media] + [""]
    usage = family.model_card_usage(base, repo_id, files) if family is not None else None
    lines += ["## Use it", ""] + (usage if usage is not None else generic_usage(base, repo_id, peft))
    lines += ["Inspect any of these files with `cogft inspect FILE`: format, rank, alpha and the scale each loader "
              "applies.", ""]
    return "\n".join(front + lines)


def generic_usage(base: str, repo_id: str, peft: bool) -> list[str]:
    """The "Use it" lines for a family that gives none (`ModelFamily.model_card_usage`) or an export without the run's
    config: a PEFT adapter (the kit's only PEFT export is CogVLM's) or a diffusers LoRA."""
    if peft:
        return ["PEFT:", "", "```python", "from peft import PeftModel", "from recipes.cogvlm import CogVLMForCausalLM",
                "", f'base = CogVLMForCausalLM.from_pretrained("{base}")',
                f'model = PeftModel.from_pretrained(base, "{repo_id}")', "```", ""]
    return ["diffusers (rank and alpha are in the file's metadata: it loads at the trained strength):", "",
            "```python", "import torch", "from diffusers import DiffusionPipeline", "",
            f'pipe = DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.bfloat16)',
            f'pipe.load_lora_weights("{repo_id}", weight_name="pytorch_lora_weights.safetensors", '
            f'adapter_name="lora")', "```", ""]


def push(adapter_dir: str, repo_id: str, dry_run: str | None = None, private: bool = False,
         token: str | None = None) -> list[Path]:
    if dry_run:
        if Path(dry_run).exists() and any(Path(dry_run).iterdir()):
            raise SystemExit(f"--dry-run {dry_run} is not empty: pass a new folder, so that it holds exactly what "
                             f"would be uploaded.")
        written = stage(Path(adapter_dir), Path(dry_run), repo_id)
        print(f"dry run: {len(written)} files that would be uploaded to {repo_id}, in {dry_run}:")
        for path in written:
            print(f"  {path.relative_to(dry_run)}")
        return written
    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as tmp:
        written = stage(Path(adapter_dir), Path(tmp), repo_id)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=tmp, commit_message="Upload LoRA with cog-finetune")
    print(f"uploaded {len(written)} files to https://huggingface.co/{repo_id} ({commit})")
    return written
