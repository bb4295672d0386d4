"""CogVideoX LoRA training-step benchmark: time per step and peak memory.

    python bench/cogvideox_step.py --size tiny                       # CPU, the tiny preset model
    python bench/cogvideox_step.py --size 5b --device cuda --gradient-checkpointing

Real sizes are built from the published transformer configs with random weights (no download), so
step times and memory are the real ones. The step is the kit's own `FinetuneModule` objective on
precomputed latents and text embeddings (the encoded cache), i.e. transformer forward + backward +
AdamW, as in finetrainers' "precomputed latents" figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finetune.adapters import LoRA  # noqa: E402
from finetune.family import parse_dtype  # noqa: E402
from finetune.module import FinetuneModule  # noqa: E402
from recipes.cogvideox.family import CogVideoX  # noqa: E402

# THUDM/CogVideoX-2b and -5b transformer/config.json (the keys that differ from the class defaults).
REAL = {
    "2b": dict(num_attention_heads=30, num_layers=30, use_rotary_positional_embeddings=False, snr=3.0),
    "5b": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True, snr=1.0),
    # THUDM/CogVideoX1.5-5B: latent frames patched in pairs, no patch bias, rotary grid up to 2400x2400
    "1.5-5b": dict(num_attention_heads=48, num_layers=42, use_rotary_positional_embeddings=True, patch_size_t=2,
                   patch_bias=False, sample_height=300, sample_width=300, sample_frames=81, snr=1.0),
}


def real_family(size: str, dtype: torch.dtype, device: str, height: int, width: int, frames: int) -> CogVideoX:
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    from recipes.cogvideox.tiny import SCHEDULER_2B

    spec = dict(REAL[size])
    snr = spec.pop("snr")
    with torch.device(device):
        transformer = CogVideoXTransformer3DModel(**spec).to(dtype)
        vae = AutoencoderKLCogVideoX().to(dtype)
        # The T5 encoder is not run (embeddings are precomputed): a 1-layer stand-in of the right width.
        text_encoder = T5EncoderModel(T5Config(vocab_size=32, d_model=4096, num_layers=1, num_heads=1, d_kv=8,
                                               d_ff=8, is_encoder_decoder=False)).to(dtype)
    scheduler = CogVideoXDDIMScheduler.from_config({**SCHEDULER_2B, "snr_shift_scale": snr})
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=text_encoder, vae=vae, transformer=transformer,
                             scheduler=scheduler)
    return CogVideoX.from_pipeline(pipe, height=height, width=width, num_frames=frames, path=f"random-{size}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=["tiny", "2b", "5b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: fp32 for tiny, bf16 otherwise")
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--frames", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--alpha", type=float, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args(argv)

    tiny = args.size == "tiny"
    dtype = parse_dtype(args.dtype or ("fp32" if tiny else "bf16"))
    h, w, f = args.height or (32 if tiny else 480), args.width or (32 if tiny else 720), args.frames or (9 if tiny else 49)
    torch.manual_seed(0)
    if tiny:
        family = CogVideoX(path="tiny", dtype=args.dtype or "fp32", height=h, width=w, num_frames=f, max_sequence_length=16)
    else:
        family = real_family(args.size, dtype, args.device, h, w, f)
    module = FinetuneModule(family, LoRA(rank=args.rank, alpha=args.alpha), optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4),
                            enable_gradient_checkpointing=args.gradient_checkpointing).to(args.device)
    module.train()
    optimizer = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])

    cfg = family.transformer.config
    latent = (args.batch_size, cfg.in_channels, (f - 1) // 4 + 1, h // 8, w // 8)  # VAE posterior layout [B, C, F, H, W]
    text_len = 16 if tiny else 226
    encoded = {"latent_mean": torch.randn(latent, device=args.device, dtype=dtype),
               "latent_logvar": torch.full(latent, -10.0, device=args.device, dtype=dtype),
               "prompt_embeds": torch.randn(args.batch_size, text_len, cfg.text_embed_dim, device=args.device, dtype=dtype)}
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=dtype) if cuda and dtype != torch.float32 else torch.autocast("cpu", enabled=False)

    def step():
        with autocast:
            loss = family.training_loss(encoded)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(args.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    result = {"size": args.size, "device": torch.cuda.get_device_name() if cuda else "cpu", "dtype": str(dtype),
              "resolution": f"{f}x{h}x{w}", "batch_size": args.batch_size, "rank": args.rank,
              "gradient_checkpointing": args.gradient_checkpointing, "steps": args.steps,
              "wall_s_per_step": wall / args.steps, "cpu_s_per_step": cpu / args.steps,
              "threads": torch.get_num_threads(),
              "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
    if cuda:
        result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
