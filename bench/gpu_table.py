"""The GPU table: seconds per optimizer step, peak memory and MFU for the CogVideoX recipes at their real sizes, with
and without each memory saver. One command on a GPU runs the whole table and writes JSON plus a markdown table:

    python bench/gpu_table.py --json docs/gpu_table.json --markdown docs/gpu_table.md
    python bench/gpu_table.py --configs cogvideox-5b-lora --savers checkpointing checkpointing+fp8
    python bench/gpu_table.py --small --device cpu       # every config and saver at a tiny size (tests/test_bench.py)

Models are built from the published transformer configs with random weights (bench/cogvideox_step.py), inputs are
random encoded latents and T5 embeddings (what the encoded cache feeds a step), batch 1, bf16 base with fp32 LoRA
under autocast. A step is the kit's `family.training_loss`, backward and the optimizer step.

- s/step: median over `--steps` timed steps after `--warmup` untimed ones (CUDA-synchronised).
- memory: `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the timed steps.
- FLOPs: `model_flops` counts the transformer's matmuls and attention analytically (per block `24 N d^2` for the
  projections and MLP, `4 N^2 d` for attention, `16 N d r` for LoRA r on q, k, v, out, plus embeddings and heads);
  a step's model FLOPs are forward + backward without recomputation (LoRA: frozen weights get no weight gradient,
  so linear layers cost 2x forward, attention 3x; full finetune 3x). `counted_forward_flops` cross-checks the
  analytic forward with `torch.utils.flop_counter.FlopCounterMode` on the `meta` device (exact shapes, no compute).
- MFU: model FLOPs per step / (s/step x the GPU's dense bf16 peak, `PEAK_BF16`); the recomputation of gradient
  checkpointing is not model work, so it lowers MFU.

Figures go into docs/benchmarks.md only when measured; a saver that does not fit a config (FP8 storage with a full
finetune) is reported as not applicable, an out-of-memory step as OOM.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from cogvideox_step import REAL, real_family  # noqa: E402

from finetune.adapters import Full, LoRA  # noqa: E402
from finetune.module import FinetuneModule  # noqa: E402

# The issue's table: CogVideoX-2B/5B LoRA and SFT at 49x480x720, CogVideoX1.5-5B LoRA at 81x768x1360.
CONFIGS = {
    "cogvideox-2b-lora": dict(size="2b", adapter="lora", frames=49, height=480, width=720),
    "cogvideox-2b-sft": dict(size="2b", adapter="full", frames=49, height=480, width=720),
    "cogvideox-5b-lora": dict(size="5b", adapter="lora", frames=49, height=480, width=720),
    "cogvideox-5b-sft": dict(size="5b", adapter="full", frames=49, height=480, width=720),
    "cogvideox15-5b-lora": dict(size="1.5-5b", adapter="lora", frames=81, height=768, width=1360),
}
SMALL = dict(frames=17, height=32, width=32)  # --small: every config at this size (and 2 blocks), for CPU tests
SAVERS = {
    "plain": {},
    "checkpointing": {"enable_gradient_checkpointing": True},
    "checkpointing+fp8": {"enable_gradient_checkpointing": True, "fp8_base": True},
    "checkpointing+swap-half": {"enable_gradient_checkpointing": True, "swap_fraction": 0.5},
    "checkpointing+adamw8bit": {"enable_gradient_checkpointing": True, "optimizer": "adamw8bit"},
}
# Dense bf16 tensor-core peaks (no sparsity), FLOP/s, from the vendors' data sheets, by a substring of the device name.
PEAK_BF16 = {"H200": 989e12, "H100 SXM": 989e12, "H100 NVL": 835e12, "H100 PCIe": 756e12, "H100": 989e12,
             "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
LORA_RANK, LORA_ALPHA = 128, 64


def peak_bf16(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in device_name), None)


def tokens(cfg, frames: int, height: int, width: int) -> tuple[int, int]:
    """(video tokens, text tokens) of one sample."""
    latent_frames = (frames - 1) // 4 + 1
    p_t = cfg.patch_size_t or 1
    latent_frames += (-latent_frames) % p_t  # 1.5 pads an odd count with the first frame
    return latent_frames // p_t * (height // 8 // cfg.patch_size) * (width // 8 // cfg.patch_size), \
        cfg.max_text_seq_length


def model_flops(cfg, frames: int, height: int, width: int, lora_rank: int = 0, batch: int = 1) -> dict[str, float]:
    """Analytic FLOPs of one transformer forward (matmuls and attention; norms and elementwise ops excluded, as
    FlopCounterMode does): `linear` (projections, MLP, LoRA, embeddings, heads) and `attention` (QK^T and AV)."""
    video, text = tokens(cfg, frames, height, width)
    n = video + text
    d = cfg.num_attention_heads * cfg.attention_head_dim
    temb, p, p_t = cfg.time_embed_dim, cfg.patch_size, cfg.patch_size_t or 1
    per_block_linear = 24 * n * d * d + 16 * n * d * lora_rank + 2 * (2 * temb * 6 * d)  # + two LayerNormZero heads
    attention = cfg.num_layers * 4 * n * n * d
    outside = (2 * video * cfg.in_channels * p * p * p_t * d  # patch embedding
               + 2 * text * cfg.text_embed_dim * d  # text projection
               + 2 * (d * temb + temb * temb)  # timestep embedding MLP
               + 2 * temb * 2 * d  # final AdaLayerNorm
               + 2 * video * d * p * p * p_t * cfg.out_channels)  # output projection
    linear = cfg.num_layers * per_block_linear + outside
    return {"linear": batch * linear, "attention": batch * attention, "forward": batch * (linear + attention)}


def step_model_flops(forward: dict[str, float], adapter: str) -> float:
    """Forward + backward without recomputation: LoRA 2x linear (no weight gradients for the frozen base) and 3x
    attention; full finetune 3x both."""
    return (2 if adapter == "lora" else 3) * forward["linear"] + 3 * forward["attention"]


def counted_forward_flops(size: str, frames: int, height: int, width: int, lora_rank: int, layers: int | None) -> int:
    """One transformer forward under FlopCounterMode on the meta device (shapes only)."""
    from torch.utils.flop_counter import FlopCounterMode

    family = build_family(size, "meta", torch.float32, frames, height, width, layers)
    if lora_rank:
        LoRA(rank=lora_rank, alpha=lora_rank).apply(family.transformer, family.lora_target_modules)
    encoded = random_encoded(family, "meta", torch.float32, frames, height, width)
    x0 = family.sample_latents(encoded)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        family.transformer(hidden_states=x0, encoder_hidden_states=encoded["prompt_embeds"],
                           timestep=torch.zeros(1, dtype=torch.long, device="meta"),
                           image_rotary_emb=family.rotary_embeddings(x0), return_dict=False)
    return counter.get_total_flops()


def build_family(size: str, device: str, dtype: torch.dtype, frames: int, height: int, width: int,
                 layers: int | None = None):
    if layers is None:
        return real_family(size, dtype, device, height, width, frames)
    saved = dict(REAL[size])
    REAL[size] = {**saved, "num_layers": layers}
    try:
        return real_family(size, dtype, device, height, width, frames)
    finally:
        REAL[size] = saved


def random_encoded(family, device: str, dtype: torch.dtype, frames: int, height: int, width: int) -> dict:
    cfg = family.transformer.config
    latent = (1, cfg.in_channels, (frames - 1) // 4 + 1, height // 8, width // 8)
    g = torch.Generator().manual_seed(0)
    mean = (torch.empty(latent, device=device) if device == "meta"
            else torch.randn(latent, generator=g).to(device, dtype))
    return {"latent_mean": mean, "latent_logvar": torch.full(latent, -10.0, device=device, dtype=dtype),
            "prompt_embeds": torch.zeros(1, cfg.max_text_seq_length, cfg.text_embed_dim, device=device, dtype=dtype)}


def make_optimizer(name: str, params):
    if name == "adamw8bit":
        from finetune.memory import adamw_8bit

        return adamw_8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def measure(name: str, saver: str, device: str, small: bool, steps: int, warmup: int) -> dict:
    config = {**CONFIGS[name], **(SMALL if small else {})}
    settings = dict(SAVERS[saver])
    frames, height, width, adapter = config["frames"], config["height"], config["width"], config["adapter"]
    row = {"config": name, "saver": saver, "resolution": f"{frames}x{height}x{width}", "adapter": adapter}
    if settings.get("fp8_base") and adapter == "full":
        return {**row, "status": "n/a (FP8 storage keeps the base frozen: LoRA only)"}
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    layers = 2 if small else None
    family = build_family(config["size"], device, dtype, frames, height, width, layers)
    lora = adapter == "lora"
    try:
        make_optimizer(settings.get("optimizer", ""), [torch.nn.Parameter(torch.zeros(1))])
    except ImportError as err:
        return {**row, "status": f"skipped ({str(err).split(';')[0]})"}
    module = FinetuneModule(family, LoRA(rank=LORA_RANK if not small else 4, alpha=LORA_ALPHA if not small else 4)
                            if lora else Full(), optimizer=lambda p: make_optimizer(settings.get("optimizer", ""), p),
                            enable_gradient_checkpointing=settings.get("enable_gradient_checkpointing", False),
                            fp8_base=settings.get("fp8_base", False))
    module.to(device).train()
    swap = None
    if settings.get("swap_fraction"):
        from finetune.memory import swap_blocks

        swap = swap_blocks(family, int(len(family.transformer_blocks()) * settings["swap_fraction"]),
                           torch.device(device))
    optimizer = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])
    encoded = random_encoded(family, device, dtype, frames, height, width)
    autocast = torch.autocast("cuda", dtype=dtype) if cuda else torch.autocast("cpu", enabled=False)

    def step() -> float:
        start = time.perf_counter()
        with autocast:
            loss = family.training_loss(encoded)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if swap is not None:
            swap.release()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    try:
        for _ in range(warmup):
            step()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        times = [step() for _ in range(steps)]
    except torch.OutOfMemoryError:
        return {**row, "status": "OOM"}
    finally:
        if cuda:
            torch.cuda.empty_cache()
    forward = model_flops(family.transformer.config, frames, height, width, LORA_RANK if lora and not small else
                          (4 if lora else 0))
    flops = step_model_flops(forward, adapter)
    seconds = statistics.median(times)
    row.update(status="ok", s_per_step=seconds, steps=steps, warmup=warmup, model_flops_per_step=flops,
               trainable_params=sum(p.numel() for p in module.parameters() if p.requires_grad))
    if cuda:
        peak = peak_bf16(torch.cuda.get_device_name())
        row.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2**30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2**30,
                   mfu=flops / seconds / peak if peak else None)
    return row


def environment(device: str) -> dict:
    import diffusers
    import peft

    env = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu",
           "torch": torch.__version__, "diffusers": diffusers.__version__, "peft": peft.__version__,
           "cuda": torch.version.cuda}
    if device.startswith("cuda"):
        env["peak_bf16_flops"] = peak_bf16(env["device"])
    return env


def markdown(report: dict) -> str:
    env = report["environment"]
    setting = ("--small: 2 blocks at 17x32x32, fp32, LoRA r4 (a harness check, not a benchmark)" if report["small"]
               else f"Batch 1, bf16 base, LoRA r{LORA_RANK} alpha {LORA_ALPHA} in fp32")
    lines = [f"Device: {env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, "
             f"CUDA {env.get('cuda')}. {setting}, median of the timed steps (`bench/gpu_table.py`).", "",
             "| config | saver | s/step | peak allocated GiB | peak reserved GiB | MFU | model TFLOP/step |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['config']} | {row['saver']} | {row['status']} | | | | |")
            continue

        def fmt(key, spec):
            return format(row[key], spec) if row.get(key) is not None else "-"

        lines.append(f"| {row['config']} | {row['saver']} | {row['s_per_step']:.3f} | "
                     f"{fmt('peak_allocated_gib', '.1f')} | {fmt('peak_reserved_gib', '.1f')} | {fmt('mfu', '.1%')} | "
                     f"{row['model_flops_per_step'] / 1e12:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--savers", nargs="+", default=list(SAVERS), choices=list(SAVERS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="tiny sizes and 2 blocks (CPU tests)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)

    rows = []
    for name in args.configs:
        for saver in args.savers:
            row = measure(name, saver, args.device, args.small, args.steps, args.warmup)
            print(json.dumps(row), flush=True)
            rows.append(row)
    report = {"environment": environment(args.device), "small": args.small, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(report))
    return report


if __name__ == "__main__":
    main()
