"""Which diffusers/peft stacks load the kit's LoRA exports, and at which strength.

    python bench/compat.py [--pairs 0.33.1:0.18.1,0.42.1:0.21.2] [--markdown docs/compatibility.md] [--json FILE]

1. In this environment (the kit's): a tiny LoRA run's exports for CogVideoX text-to-video, image-to-video and CogView4
   (rank 4, alpha 8: trained scale 2), each with every LoRA format the family writes plus `cogft convert --to
   diffusers` and `--fold-alpha`, and the update the training model applies per module (`scale * B @ A`).
2. For each diffusers/peft pair: a small venv under `<kit cache>/compat/` with only diffusers and peft installed
   (`--no-deps`, and for diffusers < 0.36 the transformers 4.x / huggingface_hub stack those versions need), everything
   else (torch above all: nothing large downloads) taken from this environment through a `.pth` file placed after the
   venv's own packages. `bench/compat_load.py` loads every file through diffusers' `load_lora_weights` + `fuse_lora`,
   ComfyUI-CogVideoXWrapper's loader block and PEFT, and compares the fused weights with the trained update.
3. A table: loader x file -> loaded modules, max error, scale ratio (1.000 = the trained strength). Native ComfyUI is
   not installable here: its rows come from the recorded rules (`finetune.lora_formats.loaders`).

Needs the package index (pip) for the first run of each pair; later runs reuse the venvs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PAIRS = [(d, p) for d in ("0.33.1", "0.34.0", "0.35.2", "0.42.1") for p in ("0.17.1", "0.18.0", "0.20.0", "0.21.2")]
# The libraries diffusers < 0.36 needs beside it (they import names transformers 5 removed); newer diffusers run on
# this environment's own transformers. Pinned to the last 4.x releases, which the users of those diffusers have.
OLD_STACK = ["transformers==4.57.6", "tokenizers==0.22.2", "huggingface_hub==0.36.0"]
RECIPES = {"cogvideox_lora": "CogVideoXPipeline", "cogvideox_i2v_lora": "CogVideoXImageToVideoPipeline",
           "cogview4_lora": "CogView4Pipeline"}


def _old(version: str) -> bool:
    return tuple(int(x) for x in version.split(".")[:2]) < (0, 36)


# -- 1. exports, in the kit's environment ----------------------------------------------------------
def make_exports(out: Path) -> list[dict]:
    """One job per recipe for `compat_load.py`: its tiny checkpoint, pipeline class and files."""
    import torch
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    from finetune.cogft import run as cogft
    from finetune.cogft.config import compose_recipe
    from finetune.run import build_module

    jobs = []
    for recipe, pipeline in RECIPES.items():
        directory = out / recipe
        cfg = compose_recipe(recipe, "tiny", ["adapter.rank=4", "adapter.alpha=8", f"run_dir={directory}"])
        module = build_module(cfg)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():  # a trained-looking adapter: B is zero in a fresh one
            for param in (p for p in module.parameters() if p.requires_grad):
                param += 0.05 * torch.randn(param.shape, generator=generator)
        family = module.family
        transformer = family.trainable_module()
        expected = {name: layer.get_delta_weight(module.adapter.adapter_name).detach().float().contiguous()
                    for name, layer in transformer.named_modules() if isinstance(layer, LoraLayer)}
        directory.mkdir(parents=True, exist_ok=True)
        save_file(expected, str(directory / "expected.safetensors"))
        export = directory / "export"
        files = {"export (default)": family.export(export, module.adapter)}
        for fmt in family.export_formats[1:]:
            files[f"export {fmt}"] = family.export_format(export, module.adapter, fmt)
        files["convert --to diffusers"] = cogft(["convert", str(files["export (default)"]),
                                                 str(directory / "converted.safetensors"), "--to", "diffusers"])
        files["convert --fold-alpha"] = cogft(["convert", str(files["export (default)"]),
                                               str(directory / "folded.safetensors"), "--to", "diffusers",
                                               "--fold-alpha"])
        jobs.append({"recipe": recipe, "pipeline": pipeline, "checkpoint": str(family.checkpoint_dir),
                     "files": {label: {"path": str(path), "expected": str(directory / "expected.safetensors")}
                               for label, path in files.items()}})
    return jobs


def native_comfy_rows(jobs: list[dict]) -> list[dict]:
    """Native ComfyUI by its recorded rules (`cogft inspect`'s loader report)."""
    from finetune.lora_formats.loaders import describe

    rows = []
    for job in jobs:
        for label, entry in job["files"].items():
            report = describe(entry["path"], _names(job["recipe"]))["loaders"]["comfyui_native"]
            rows.append({"recipe": job["recipe"], "file": label, "loader": "native ComfyUI (rules)",
                         "diffusers": "-", "peft": "-", "loads": report.get("loads"),
                         "scale_ratio": report.get("strength"), "note": report.get("note", "")})
    return rows


def _names(recipe: str):
    from finetune.cogft.config import compose_recipe

    cfg = compose_recipe(recipe, "tiny")
    from hydra.utils import get_class

    return get_class(cfg.model._target_).lora_names


# -- 2. the venvs --------------------------------------------------------------------------------
def venv_for(diffusers: str, peft: str, root: Path) -> Path:
    """A venv with only diffusers==D and peft==P of its own (installed before the link to this environment exists, so
    pip never touches this environment's packages); the rest from this environment, after them on sys.path."""
    env = root / f"diffusers{diffusers}-peft{peft}"
    python = env / "bin" / "python"
    if (env / "ready").is_file():
        return python
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(env)], check=True)
    packages = [f"diffusers=={diffusers}", f"peft=={peft}"] + (OLD_STACK if _old(diffusers) else [])
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", *packages], check=True)
    site = subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    ours = subprocess.check_output([sys.executable, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    Path(site, "zz_kit_environment.pth").write_text(ours + "\n")  # `zz`: read last, after the venv's own packages
    (env / "ready").write_text("ok\n")
    return python


def run_pair(python: Path, jobs: list[dict], work: Path) -> list[dict]:
    rows = []
    for job in jobs:
        job_file = work / f"{job['recipe']}.job.json"
        job_file.write_text(json.dumps(job))
        result = subprocess.run([str(python), str(REPO / "bench" / "compat_load.py"), str(job_file)],
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                cwd=str(work))
        lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
        if result.returncode != 0 and not lines:
            tail = (result.stderr.strip().splitlines() or ["?"])[-1][:200]
            lines = [{"file": "*", "loader": "*", "loads": False, "error": f"does not import: {tail}"}]
        rows += [{"recipe": job["recipe"], **line} for line in lines]
    return rows


# -- 3. the table --------------------------------------------------------------------------------
def cell(row: dict) -> str:
    if row.get("loads") is None and "error" in row:
        return "harness error"
    if not row.get("loads"):
        return "fails: " + row.get("error", row.get("note", "0 modules"))[:70]
    ratio = row.get("scale_ratio")
    text = f"{ratio:.3f}" if isinstance(ratio, float) else str(ratio)
    if "modules" in row:
        text += f" ({row['modules']}/{row['expected_modules']} modules, err {row['max_error']:.1e})"
    return text


def markdown(rows: list[dict], pairs: list[tuple[str, str]]) -> str:
    out = []
    for recipe in RECIPES:
        sub = [r for r in rows if r["recipe"] == recipe]
        files = list(dict.fromkeys(r["file"] for r in sub if r["file"] != "*"))
        out += [f"### {recipe}", "", "| diffusers | peft | loader | " + " | ".join(files) + " |",
                "|---|---|---|" + "---|" * len(files)]
        for d, p in pairs + [("-", "-")]:
            here = [r for r in sub if str(r.get("diffusers")) == d and str(r.get("peft")) == p] if d != "-" else \
                [r for r in sub if r.get("diffusers") == "-"]
            broken = [r for r in sub if r["file"] == "*" and r.get("pair") == f"{d}:{p}"]
            if broken:
                out.append(f"| {d} | {p} | all | " + " | ".join([cell(broken[0])] * len(files)) + " |")
                continue
            for loader in dict.fromkeys(r["loader"] for r in here):
                cells = {r["file"]: cell(r) for r in here if r["loader"] == loader}
                out.append(f"| {d} | {p} | {loader} | " + " | ".join(cells.get(f, "") for f in files) + " |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", default=",".join(f"{d}:{p}" for d, p in PAIRS),
                        help="diffusers:peft pairs, comma-separated")
    parser.add_argument("--work", default=None, help="where exports and venvs go (default: <kit cache>/compat)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    args = parser.parse_args(argv)
    from finetune.hub import cache_root

    work = Path(args.work) if args.work else cache_root() / "compat"
    work.mkdir(parents=True, exist_ok=True)
    pairs = [tuple(p.split(":")) for p in args.pairs.split(",") if p]
    jobs = make_exports(work / "exports")
    rows = native_comfy_rows(jobs)
    for diffusers, peft in pairs:
        print(f"diffusers {diffusers} + peft {peft} ...", flush=True)
        for row in run_pair(venv_for(diffusers, peft, work / "venvs"), jobs, work):
            rows.append({**row, "pair": f"{diffusers}:{peft}", "diffusers": row.get("diffusers", diffusers),
                         "peft": row.get("peft", peft)})
    table = markdown(rows, pairs)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
