"""The GPU table: seconds per optimizer step, peak memory and MFU for the recipes at their real sizes, with and
without each memory saver. One command on a GPU runs the whole table and writes JSON plus a markdown table:

    python bench/gpu_table.py --json docs/gpu_table.json --markdown docs/gpu_table.md
    python bench/gpu_table.py --configs cogvideox-5b-lora --savers checkpointing checkpointing+fp8
    python bench/gpu_table.py --small --device cpu   # every config and saver at a tiny size (tests/test_gpu_table.py)

Configs: CogVideoX-2B/5B LoRA and SFT at 49x480x720, CogVideoX1.5-5B LoRA at 81x768x1360, CogView4-6B LoRA at
1024x1024 (a 128-token caption), the CogVLM-17B captcha LoRA at 490 px. Models are built from the published configs
with random weights (bench/gpu_models.py), inputs are random cached encodings (latents and text embeddings; the
CogVLM image and tokens), batch 1, bf16 base with fp32 trainable weights under autocast. A step is the kit's
`family.training_loss`, backward and the optimizer step.

- s/step: median over `--steps` timed steps after `--warmup` untimed ones (CUDA-synchronised).
- memory: `torch.cuda.max_memory_allocated` / `max_memory_reserved` over the timed steps.
- FLOPs: each model's `forward_flops` counts its network's matmuls and attention analytically (diffusion
  transformers: per block `24 N d^2` for the projections and MLP, `4 N^2 d` for attention, `16 N d r` for LoRA r on
  q, k, v, out, plus embeddings and heads; CogVLM: ViT, adapter, expert decoder and LM head); a step's model FLOPs
  are forward + backward without recomputation (LoRA: frozen weights get no weight gradient, so linear layers cost
  2x forward, attention 3x; full finetune 3x). `counted_forward_flops` cross-checks the analytic forward with
  `torch.utils.flop_counter.FlopCounterMode` on the `meta` device (exact shapes, no compute).
- MFU: model FLOPs per step / (s/step x the GPU's dense bf16 peak, `PEAK_BF16`); the recomputation of gradient
  checkpointing is not model work, so it lowers MFU.

Figures go into docs/benchmarks.md only when measured; a saver that does not fit a config (FP8 storage with a full
finetune or a non-diffusers model) is reported as not applicable, an out-of-memory step as OOM.
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

from gpu_models import CogVideoXBench, CogView4Bench, CogVLMBench  # noqa: E402

from finetune.adapters import Full, LoRA  # noqa: E402
from finetune.module import FinetuneModule  # noqa: E402

# The issue's table: CogVideoX-2B/5B LoRA and SFT at 49x480x720, CogVideoX1.5-5B LoRA at 81x768x1360, CogView4-6B
# LoRA at 1024x1024, the CogVLM captcha LoRA at 490 (bench/gpu_models.py builds each).
CONFIGS = {
    "cogvideox-2b-lora": (CogVideoXBench, dict(size="2b", frames=49, height=480, width=720), "lora"),
    "cogvideox-2b-sft": (CogVideoXBench, dict(size="2b", frames=49, height=480, width=720), "full"),
    "cogvideox-5b-lora": (CogVideoXBench, dict(size="5b", frames=49, height=480, width=720), "lora"),
    "cogvideox-5b-sft": (CogVideoXBench, dict(size="5b", frames=49, height=480, width=720), "full"),
    "cogvideox15-5b-lora": (CogVideoXBench, dict(size="1.5-5b", frames=81, height=768, width=1360), "lora"),
    "cogview4-6b-lora": (CogView4Bench, dict(height=1024, width=1024, text_tokens=128), "lora"),
    "cogvlm-captcha-lora": (CogVLMBench, dict(text_tokens=12, label_tokens=7), "lora"),
}
SMALL_LAYERS = 2  # --small: every config at its model's `small` size with this many blocks, for CPU tests
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
# The adapters: LoRA r128 alpha 64 on the diffusion transformers (the official CogVideo and CogKit setting); the
# CogVLM captcha recipe's r10 alpha 1 with its fully trained ViT MLPs (conf/recipe/cogvlm_captcha_lora.yaml).
LORA_RANK, LORA_ALPHA = 128, 64
SMALL_LORA = 4


def peak_bf16(device_name: str) -> float | None:
    return next((peak for key, peak in PEAK_BF16.items() if key in device_name), None)


def bench(name: str, small: bool = False):
    """The config's model bench (bench/gpu_models.py), at its small size with `small`."""
    kind, settings, _ = CONFIGS[name]
    return kind(**{**settings, **(kind.small if small else {})})


def lora(name: str, small: bool = False) -> LoRA | Full:
    """The config's adapter (LoRA at its rank and alpha, or Full)."""
    model = bench(name, small)
    if CONFIGS[name][2] == "full":
        return Full()
    if isinstance(model, CogVLMBench):
        return LoRA(rank=SMALL_LORA if small else 10, alpha=1, modules=model.trained_modules)
    return LoRA(rank=SMALL_LORA, alpha=SMALL_LORA) if small else LoRA(rank=LORA_RANK, alpha=LORA_ALPHA)


def step_model_flops(forward: dict[str, float], adapter: str) -> float:
    """Forward + backward without recomputation: LoRA 2x linear (no weight gradients for the frozen base) and 3x
    attention, plus the weight gradients of modules trained fully next to the LoRA (`trained_linear`: the CogVLM
    recipe's ViT MLPs); full finetune 3x both."""
    if adapter == "lora":
        return 2 * forward["linear"] + forward.get("trained_linear", 0) + 3 * forward["attention"]
    return 3 * forward["linear"] + 3 * forward["attention"]


def counted_forward_flops(name: str, small: bool = False, device: str = "meta") -> int:
    """One forward of the config's network under FlopCounterMode (on `meta`: shapes only), with its LoRA."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = bench(name, small)
    family = model.build(device, torch.float32, SMALL_LAYERS if small else None)
    adapter = lora(name, small)
    if isinstance(adapter, LoRA):
        adapter.apply(family.trainable_module(), family.lora_target_modules)
    encoded = model.inputs(family, device, torch.float32)
    # Attention through the math backend (QK^T and AV as matmuls): FlopCounterMode has no formula for the CPU's
    # flash kernel.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.forward(family, encoded)
    return counter.get_total_flops()


def analytic_forward_flops(name: str, small: bool = False) -> dict[str, float]:
    """The config's analytic forward FLOPs (its network built on `meta` for the config values)."""
    model, adapter = bench(name, small), lora(name, small)
    family = model.build("meta", torch.float32, SMALL_LAYERS if small else None)
    return model.forward_flops(family, adapter.rank if isinstance(adapter, LoRA) else 0)


def make_optimizer(name: str, params):
    if name == "adamw8bit":
        from finetune.memory import adamw_8bit

        return adamw_8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def measure(name: str, saver: str, device: str, small: bool, steps: int, warmup: int) -> dict:
    model, adapter = bench(name, small), lora(name, small)
    settings = dict(SAVERS[saver])
    kind = "lora" if isinstance(adapter, LoRA) else "full"
    row = {"config": name, "saver": saver, "resolution": model.resolution, "adapter": kind}
    if settings.get("fp8_base") and kind == "full":
        return {**row, "status": "n/a (FP8 storage keeps the base frozen: LoRA only)"}
    if settings.get("fp8_base") and isinstance(model, CogVLMBench):
        return {**row, "status": "n/a (FP8 storage is diffusers' layerwise casting: diffusers models only)"}
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)
    family = model.build(device, dtype, SMALL_LAYERS if small else None)
    try:
        make_optimizer(settings.get("optimizer", ""), [torch.nn.Parameter(torch.zeros(1))])
    except ImportError as err:
        return {**row, "status": f"skipped ({str(err).split(';')[0]})"}
    module = FinetuneModule(family, adapter, optimizer=lambda p: make_optimizer(settings.get("optimizer", ""), p),
                            enable_gradient_checkpointing=settings.get("enable_gradient_checkpointing", False),
                            fp8_base=settings.get("fp8_base", False))
    module.to(device).train()
    swap = None
    if settings.get("swap_fraction"):
        from finetune.memory import swap_blocks

        swap = swap_blocks(family, int(len(family.transformer_blocks()) * settings["swap_fraction"]),
                           torch.device(device))
    optimizer = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])
    encoded = model.inputs(family, device, dtype)
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
    forward = model.forward_flops(family, adapter.rank if kind == "lora" else 0)
    flops = step_model_flops(forward, kind)
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
    setting = (f"--small: {SMALL_LAYERS} blocks at small sizes, fp32, LoRA r{SMALL_LORA} (a harness check, not a "
               f"benchmark)" if report["small"] else f"Batch 1, bf16 base, trained weights in fp32; LoRA r{LORA_RANK} "
               f"alpha {LORA_ALPHA} (CogVLM: the captcha recipe's r10 alpha 1 and ViT MLPs 46-54)")
    lines = [f"Device: {env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}, "
             f"CUDA {env.get('cuda')}. {setting}, median of the timed steps (`bench/gpu_table.py`).", "",
             "| config | resolution | saver | s/step | peak allocated GiB | peak reserved GiB | MFU "
             "| model TFLOP/step |",
             "|---|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        if row["status"] != "ok":
            lines.append(f"| {row['config']} | {row['resolution']} | {row['saver']} | {row['status']} | | | | |")
            continue

        def fmt(key, spec):
            return format(row[key], spec) if row.get(key) is not None else "-"

        lines.append(f"| {row['config']} | {row['resolution']} | {row['saver']} | {row['s_per_step']:.3f} | "
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
