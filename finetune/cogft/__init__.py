"""`cogft`: report on data; inspect, export, convert, merge, generate and publish what the kit trains.

    cogft data DATA --recipe R [--sheet FILE.png]  the data report: buckets, frames, sizes, caption tokens, skips
    cogft inspect FILE_OR_DIR                     what a LoRA file is, and at which scale each loader applies it
    cogft export CKPT                             a training checkpoint -> the recipe's export (+ --formats comfy)
    cogft convert IN OUT --to diffusers|comfy|kohya [--alpha A] [--fold-alpha]
    cogft merge --recipe R --lora DIR[:SCALE] --out DIR
    cogft generate --recipe R --prompt TEXT [--image IMG] [--lora DIR[:SCALE]] --out DIR
    cogft runs [ROOT]                             the runs under outputs/: finished, failed or interrupted, resume command
    cogft push EXPORT_DIR --repo USER/NAME [--dry-run DIR]
    cogft caption DATA --out DIR [--preset tiny]  captions for raw videos/images, in the layout train.py reads
    cogft train recipe=R [preset=tiny] [KEY=VALUE ...]   `python train.py` from the installed package, anywhere

`python train.py recipe=...` trains; this command works on what it wrote. Each subcommand has `--help`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from finetune.errors import UserError

from .config import model_names, recipe_names


def _family_option(parser) -> None:
    parser.add_argument("--family", default=None, choices=model_names(),
                        help="the model the LoRA is for (conf/model/NAME.yaml): how its module names are spelled by "
                             "other tools (default: recognized from the file's names and shapes, else unknown)")


def _model_options(parser) -> None:
    parser.add_argument("--recipe", required=True, choices=recipe_names(), metavar="RECIPE",
                        help=f"the recipe whose model to load (conf/recipe/RECIPE.yaml): {', '.join(recipe_names())}")
    parser.add_argument("--preset", default=None, help="e.g. tiny: the recipe's tiny offline model and sizes")
    parser.add_argument("--model", default=None, help="model.path: a hub id, a local checkpoint folder or `tiny`")
    parser.add_argument("--dtype", default=None, help="model.dtype: fp32, bf16 or fp16 (default: the recipe's)")
    parser.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                        help="a LoRA file or export folder in any format `inspect` knows, at SCALE (default 1.0); "
                             "repeat for several")
    parser.add_argument("--force", action="store_true",
                        help="apply a --lora recorded or recognized as another model family's (its tensor shapes "
                             "must still fit this model's modules)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cogft", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.split("\n")[2:]))
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="the data report (and a contact sheet) of a dataset as a recipe trains on it")
    p.add_argument("data", help="data.root: a folder in any layout the recipe's data module reads, a dataset, or demo")
    p.add_argument("--recipe", required=True, choices=recipe_names(), metavar="RECIPE",
                   help="the recipe whose data module and model decide buckets and caption limits")
    p.add_argument("--preset", default=None, help="e.g. tiny: the recipe's tiny offline model and sizes")
    p.add_argument("--model", default=None, help="model.path: a hub id (configs and tokenizer only), a folder, tiny")
    p.add_argument("--sheet", default=None, metavar="FILE.png",
                   help="write a contact sheet: one thumbnail per sample, grouped by bucket, its caption under it")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a setting as train.py takes it, e.g. --set data.trigger=sks (repeat for several)")

    p = sub.add_parser("inspect", help="what a LoRA file is and how each loader applies it")
    p.add_argument("path", help="a LoRA .safetensors (or SAT .pt) file, or the folder holding it")
    _family_option(p)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--diffusers-version", default=None, metavar="X.Y.Z",
                   help="say what this diffusers makes of the file (default: the installed one); 0.33 ignores the "
                        "header, 0.34+ hands it to peft's LoraConfig")
    p.add_argument("--peft-version", default=None, metavar="X.Y.Z",
                   help="the peft beside it (default: the installed one): a header field it lacks fails the load")

    p = sub.add_parser("export", help="a training checkpoint to the recipe's export format(s)")
    p.add_argument("ckpt", help="a Lightning checkpoint (run_dir/checkpoints/last.ckpt; a DeepSpeed folder too)")
    p.add_argument("--config", default=None, help="the run's config.yaml (default: next to checkpoints/)")
    p.add_argument("--out", default=None, help="output folder (default: run_dir/export)")
    p.add_argument("--formats", default="", help="extra LoRA formats, comma-separated: comfy, kohya")

    p = sub.add_parser("convert", help="a LoRA file to diffusers, native ComfyUI or kohya layout")
    p.add_argument("source", help="the kit's export, a SAT checkpoint, a CogKit adapter_model.safetensors, a "
                                  "finetrainers or diffusers-example file, a ComfyUI or kohya file")
    p.add_argument("out", help="a .safetensors path, or a folder (the format's usual file name inside)")
    p.add_argument("--to", required=True, choices=["diffusers", "comfy", "kohya"])
    p.add_argument("--alpha", type=float, default=None,
                   help="the alpha it was trained with, for files that store none (diffusers-example files; CogKit "
                        "files are assumed alpha 64 at rank 128); overrides what the file says")
    p.add_argument("--fold-alpha", action="store_true",
                   help="fold alpha/rank into lora_B (alpha = rank in a diffusers header, no .alpha keys): any "
                        "loader that reads the key names then applies the trained update at strength 1.0 (the "
                        "training export's diffusers file is written so)")
    _family_option(p)

    p = sub.add_parser("merge", help="fuse LoRAs into the base model and save a full model",
                       description="Each --lora PATH:SCALE adds SCALE x its LoRA update (W + SCALE * alpha/rank * B @ A). "
                                   "Modules an adapter trained fully (PEFT's modules_to_save: the CogVLM captcha "
                                   "recipe's ViT MLPs) replace the base's as trained, whatever SCALE, unless "
                                   "--blend-full-modules.")
    _model_options(p)
    p.add_argument("--out", required=True, help="output folder (diffusers layout; HF layout for CogVLM)")
    p.add_argument("--blend-full-modules", action="store_true",
                   help="fully trained modules at the LoRA's scale too: W_base + SCALE * (W_trained - W_base) "
                        "(default: as trained)")

    p = sub.add_parser("generate", help="videos, images or captcha readings with a base model and LoRAs")
    _model_options(p)
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--image", action="append", default=[],
                   help="image-to-video: the first frame (one, or one per prompt); CogVLM: the images to read")
    p.add_argument("--out", required=True, help="output folder: NN.mp4 / NN.png (CogVLM: predictions.tsv)")
    p.add_argument("--seed", type=int, default=42, help="prompt i uses seed + i")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: the pipeline's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="video frames (8N+1; 16N+1 for CogVideoX1.5)")
    p.add_argument("--fps", type=int, default=None)

    p = sub.add_parser("train", help="train a recipe from the installed package (as python train.py in a checkout)",
                       add_help=False)
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="recipe=NAME [preset=tiny] KEY=VALUE ... (Hydra)")

    p = sub.add_parser("runs", help="the runs under a folder: how each ended, its steps, exports and resume command")
    p.add_argument("root", nargs="?", default="outputs", help="where the runs are (default: outputs)")

    p = sub.add_parser("caption", help="caption videos (CogVLM2-Caption) and images (CogVLM2) into a training layout",
                       description="Writes DIR/metadata.jsonl (file_name, prompt) and prompts.txt/videos.txt; "
                                   "resumes an interrupted run without recaptioning (docs/data.md#captioning).")
    p.add_argument("data", help="a folder of videos and/or images (plain, or any layout the data modules read)")
    p.add_argument("--out", required=True, help="where the layout goes (DATA itself to caption in place)")
    p.add_argument("--model", default=None, help="the video captioner: a hub id, a local folder or `tiny` "
                                                 "(default THUDM/cogvlm2-llama3-caption)")
    p.add_argument("--image-model", default=None, help="the image captioner (default THUDM/cogvlm2-llama3-chat-19B)")
    p.add_argument("--preset", default=None, help="tiny: tiny random captioners, offline (gibberish captions)")
    p.add_argument("--prompt", default=None, help="the question asked about every file (default: the published "
                                                  "'Please describe this video in detail.' / '... image ...')")
    p.add_argument("--max-new-tokens", type=int, default=None, help="caption length cap (default 2048, tiny 8)")
    p.add_argument("--batch-size", type=int, default=1, help="files per generate call")
    p.add_argument("--dtype", default=None, help="bf16 (default), fp16 or fp32")
    p.add_argument("--quantize", default=None, choices=["nf4", "int8"],
                   help="load the captioner quantized (bitsandbytes, CUDA): the 24 GB case")
    p.add_argument("--overwrite", action="store_true", help="caption again files that already have a caption")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("push", help="upload an adapter with a model card to the Hugging Face Hub")
    p.add_argument("adapter", help="the export folder (run_dir/export)")
    p.add_argument("--repo", required=True, help="USER/NAME on the Hub")
    p.add_argument("--dry-run", default=None, metavar="DIR", help="write exactly what would be uploaded into DIR")
    p.add_argument("--private", action="store_true")
    p.add_argument("--token", default=None, help="default: the saved login (`hf auth login`) or HF_TOKEN")
    return parser


def main(argv: list[str] | None = None) -> None:
    """The console script: exit status 0 on success (the result is printed, not returned)."""
    run(sys.argv[1:] if argv is None else argv)


def run(argv: list[str]):
    """Run one subcommand; returns its result (the report, the written paths) for tests and scripts."""
    args = build_parser().parse_args(argv)
    if args.command == "train":  # its errors are told as train.py tells them (finetune/console.py)
        from .train import train

        return train(args.overrides)
    from finetune.console import quiet_known_warnings

    quiet_known_warnings()
    try:
        return _dispatch(args)
    except (UserError, FileNotFoundError, ValueError, NotImplementedError) as err:  # bad input (the kit's user
        # errors, finetune/errors.py), or what the recipe's family cannot do (`ModelFamily`'s defaults): the message
        # names the file, value or method and the fix; HYDRA_FULL_ERROR=1 shows the traceback
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(f"error: cogft {args.command}: {err}") from None


def _dispatch(args):
    if args.command == "data":
        from .data import data_command

        return data_command(args.data, args.recipe, args.preset, args.model, args.sheet, args.json, args.overrides)
    if args.command == "inspect":
        from .files import main_inspect

        return main_inspect(args)
    if args.command == "convert":
        from .files import main_convert

        return main_convert(args)
    if args.command == "export":
        from .models import export

        return export(args.ckpt, args.out, args.config, [f for f in args.formats.split(",") if f])
    if args.command == "merge":
        from .models import merge

        return merge(args.recipe, args.lora, args.out, args.preset, args.model, args.dtype, args.blend_full_modules,
                     args.force)
    if args.command == "generate":
        from .models import generate

        if not args.prompt and not args.image:
            raise SystemExit("cogft generate: pass --prompt (diffusion recipes) or --image (CogVLM).")
        return generate(args.recipe, args.prompt, args.out, args.preset, args.model, args.dtype, args.lora, args.image,
                        args.seed, args.steps, args.guidance, args.height, args.width, args.frames, args.fps,
                        args.force)
    if args.command == "runs":
        from finetune.runs import runs_table

        table = runs_table(Path(args.root))
        print(table)
        return table
    if args.command == "caption":
        from .caption import caption

        return caption(args.data, args.out, args.model, args.image_model, args.prompt, args.max_new_tokens,
                       args.batch_size, args.dtype, args.quantize, args.overwrite, args.preset, not args.no_progress)
    from .push import push

    return push(args.adapter, args.repo, args.dry_run, args.private, args.token)


if __name__ == "__main__":
    main()
