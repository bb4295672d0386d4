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
from PIL import Image

from finetune.family import parse_dtype

from .family import CogVLM, generate_answers
from .modeling_cogvlm import CogVLMForCausalLM
from .prompting import CogVLMProcessor


def load_model(model_dir: str, adapter: str | None = None, dtype: str = "fp32", device: str = "cpu"):
    network = CogVLMForCausalLM.from_pretrained(model_dir, dtype=parse_dtype(dtype))
    if adapter:
        from peft import PeftModel

        network = PeftModel.from_pretrained(network, adapter).merge_and_unload()
    return network.to(device).eval()


@torch.no_grad()
def predict(network, processor: CogVLMProcessor, images: list[Image.Image], max_new_tokens: int = 10) -> list[str]:
    """Greedy answers to the processor's prompt about each image, decoded by transformers' `generate` as the recipe's
    evaluation decodes."""
    batch = {k: v.to(network.device) for k, v in processor.prompt_batch(images).items()}
    dtype = next(network.parameters()).dtype
    return generate_answers(network, processor.tokenizer, batch["input_ids"], batch["images"].to(dtype),
                            batch["token_type_ids"], batch["attention_mask"], max_new_tokens)


def main(argv: list[str] | None = None) -> list[tuple[str, str]]:
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
    processor = CogVLM.data_processor(CogVLM.local_checkpoint(args.model), tokenizer_path=args.tokenizer,
                                      prompt=args.prompt, template_version=args.template)
    network = load_model(processor.model_dir, args.adapter, args.dtype, args.device)
    results = []
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start: start + args.batch_size]
        images = []
        for path in paths:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        answers = predict(network, processor, images, args.max_new_tokens)
        for path, answer in zip(paths, answers):
            print(f"{path}\t{answer}", flush=True)
            results.append((path, answer))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
