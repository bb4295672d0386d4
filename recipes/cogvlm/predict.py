"""Read captchas (or answer any prompt about images) with a CogVLM and an optional exported LoRA.

    python -m recipes.cogvlm.predict --model THUDM/cogvlm-base-490-hf --adapter outputs/cogvlm_captcha_lora/RUN/export \
        img1.png img2.jpg
    python -m recipes.cogvlm.predict --model outputs/cogvlm_captcha_sft/RUN/export img1.png   # a merged/full export

Prints one `file<TAB>prediction` line per image. The adapter (a PEFT folder written by the recipe's export) is
merged into the base weights before decoding; decoding is greedy (transformers' `generate`), as the
recipe's evaluation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from finetune.family import GenerationRequest

from .family import CogVLM
from .family import predict_images as predict  # noqa: F401  (the greedy reading itself, for scripts and tests)


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
    """The same code as `cogft generate --recipe cogvlm_captcha_lora --image ...`: the family's `merge_loras` (the
    adapter at scale 1) and `generate` (the recipe's greedy reading), on a model given by path instead of a recipe."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--model", default="THUDM/cogvlm-base-490-hf", help="hub id, local folder or `tiny`")
    parser.add_argument("--adapter", default=None, help="an exported PEFT adapter folder (run_dir/export)")
    parser.add_argument("--tokenizer", default="lmsys/vicuna-7b-v1.5", help="when the model folder has none")
    parser.add_argument("--prompt", default="CAPTCHA:")
    parser.add_argument("--template", default=None, help="base, chat or vqa (default: the checkpoint's)")
    parser.add_argument("--max-new-tokens", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    missing = [path for path in args.images if not Path(path).is_file()]
    if missing:
        parser.error(f"no such image file: {', '.join(missing)}")
    family = CogVLM(path=args.model, tokenizer_path=args.tokenizer, dtype=args.dtype,
                    max_new_tokens=args.max_new_tokens, prompt=args.prompt, template_version=args.template)
    if args.adapter:
        family.merge_loras([(args.adapter, 1.0)])
    family.to(args.device).prepare_inference()
    results = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start: start + args.batch_size]
        samples = family.generate([GenerationRequest("", path) for path in paths], seed=0)
        for path, sample in zip(paths, samples):
            print(f"{path}\t{sample.data}", flush=True)
            results.append((path, sample.data))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
