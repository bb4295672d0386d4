"""CogVLM captcha recipe: parameter counts and the static training memory they imply (no GPU needed).

    python bench/cogvlm_memory.py                 # CogVLM-17B (cogvlm-base-490-hf config), the recipe's adapter
    python bench/cogvlm_memory.py --rank 10 --modules vision.transformer.layers.46.mlp ...
    python bench/cogvlm_memory.py --model cogvlm2 --optimizer adamw8bit   # CogVLM2-19B, 8-bit AdamW moments

The model is built on the `meta` device from the published config, the recipe's LoRA is added with peft,
and the bytes are counted: bf16 base weights, fp32 trainable weights, fp32 gradients and the optimizer state
on the GPU (`--optimizer`: adamw, two fp32 moments = 8 bytes per trainable parameter; adamw8bit, two 8-bit
moments = 2 bytes, block-wise scales not counted; offload, the moments kept on the CPU as DeepSpeed's optimizer
offload does = 0 bytes). Activations are not included (they depend on batch, sequence and checkpointing): measure
those on a GPU with runs of the recipe (`train/peak_memory_gb`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.adapters import LoRA  # noqa: E402
from recipes.cogvlm import CogVLMConfig, CogVLMForCausalLM  # noqa: E402
from recipes.cogvlm.family import lora_target_modules  # noqa: E402

# THUDM/cogvlm-base-490-hf config.json (docs/cogvlm.md#architecture).
COGVLM_17B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  vocab_size=32000, template_version="base",
                  vision_config=dict(hidden_size=1792, num_hidden_layers=63, num_heads=16, intermediate_size=15360,
                                     image_size=490, patch_size=14, num_positions=1226, in_channels=3,
                                     layer_norm_eps=1e-6, hidden_act="gelu", dropout_prob=0.0))
# THUDM/cogvlm2-llama3-chat-19B: Llama-3-8B decoder (GQA, 8 KV heads), 1344 px images (docs/cogvlm.md#architecture).
COGVLM2_19B = {**COGVLM_17B, "intermediate_size": 14336, "vocab_size": 128256, "num_multi_query_heads": 8,
               "template_version": "chat",
               "vision_config": {**COGVLM_17B["vision_config"], "image_size": 1344, "num_positions": 9217}}
MODELS = {"cogvlm": COGVLM_17B, "cogvlm2": COGVLM2_19B}
OFFICIAL_MODULES = [f"vision.transformer.layers.{i}.mlp" for i in range(46, 55)]
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "offload": 0}  # optimizer state on the GPU per trainable parameter


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=1)
    parser.add_argument("--targets", nargs="*", default=["language_expert_attention", "vit_attention"])
    parser.add_argument("--modules", nargs="*", default=OFFICIAL_MODULES)
    parser.add_argument("--model", choices=sorted(MODELS), default="cogvlm")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZER_BYTES), default="adamw")
    args = parser.parse_args(argv)

    with torch.device("meta"):
        model = CogVLMForCausalLM(CogVLMConfig(**MODELS[args.model])).to(torch.bfloat16)
    total = sum(p.numel() for p in model.parameters())
    model.requires_grad_(False)
    LoRA(rank=args.rank, alpha=args.alpha, modules=args.modules or None).apply(model, lora_target_modules(args.targets))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    gib = 2**30
    result = {"model": args.model, "optimizer": args.optimizer, "total_params": total, "trainable_params": trainable,
              "base_weights_bf16_gib": frozen * 2 / gib,
              "trainable_fp32_weights_grads_adamw_gib": trainable * 4 * 4 / gib,
              "trainable_on_gpu_gib": trainable * (4 + 4 + OPTIMIZER_BYTES[args.optimizer]) / gib}
    result["static_total_gib"] = result["base_weights_bf16_gib"] + result["trainable_on_gpu_gib"]
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
