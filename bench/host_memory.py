"""Host memory per rank: the peak RSS of a cold and a warm tiny run, and the bytes each component takes at real size.

    OMP_NUM_THREADS=1 python bench/host_memory.py                 # both parts, printed as tables and JSON
    OMP_NUM_THREADS=1 python bench/host_memory.py --sizes-only    # the real-size bytes only (meta device, ~2 s)

Tiny runs: each is a fresh process doing what `python train.py recipe=cogvideox_lora preset=tiny` does
(`trainer.max_steps=2`, no validation samples, no export, its own run directory and caches in a temporary folder);
the parent reads the child's peak resident set (`os.wait4`'s `ru_maxrss`). In order: `cold` (an empty encoded cache:
the encoders load, encode the samples and are released before step 1), `warm` (the same cache: no text encoder and
no VAE load), and `warm-eager` (the same cache, with every component loaded by the pipeline at start, as the kit did
before lazy encoders: `recipes.diffusion.pipeline.DEFERRED = ()`). At the tiny size the weights are a few MB, so the
RSS is mostly the imports; the real-size table is what the lazy encoders save.

Real size: each published model is built from its config on the meta device (no memory, no download) and its
parameters and buffers counted in bf16 (what transformers keeps in fp32 at bf16 in fp32: nothing here), per component. Per
rank: under DDP (and FSDP, which shards the trained network but not the encoders) every process loads its own copy
of every component it uses: `eager` is what each rank held in host RAM for the whole run before lazy encoders (the
parked VAE and text encoder), `lazy, warm` what it holds now on a warm cache (none), and the eight-GPU node column
the eager bytes times 8. The trained network's bytes pass through host RAM once while it loads (in its dtype, no
fp32 copy) and then live on the accelerator.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

RUN = ["recipe=cogvideox_lora", "preset=tiny", "trainer.max_steps=2", "callbacks.samples=null",
       "callbacks.export=null", "callbacks.checkpoint=null", "logger=none", "data.demo_count=2"]
ENCODERS_LINE = "encoders before the first step:"


# -- tiny runs --------------------------------------------------------------------------------------
def child(eager: bool, overrides: list[str]) -> None:
    """Inside the measured process: train.py's `main` with `overrides`; `eager`: every component loaded at start."""
    if eager:
        import recipes.diffusion.pipeline as pipeline

        pipeline.DEFERRED = ()
    sys.argv = [str(REPO / "train.py"), *overrides]
    sys.path.insert(0, str(REPO))
    import runpy

    runpy.run_path(str(REPO / "train.py"), run_name="__main__")


def measure(root: Path, name: str, eager: bool = False) -> dict:
    """One tiny run in a fresh process; its peak RSS (MiB) and what the kit said it loaded before step 1."""
    env = {**os.environ, "COGFT_CACHE": str(root / "cache"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, str(Path(__file__).resolve()), "--child", *(["--eager"] if eager else []), "--",
               *RUN, f"run_dir={root / name}", f"module.cache_dir={root / 'encoded'}"]
    process = subprocess.Popen(command, env=env, cwd=str(REPO), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    output = process.stdout.read()  # until the child closes it; then reap it ourselves, for its resource usage
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    process.stdout.close()
    if process.returncode:
        raise RuntimeError(f"the {name} run failed:\n{output[-3000:]}")
    loaded = next((line.split(ENCODERS_LINE, 1)[1].strip() for line in output.splitlines() if ENCODERS_LINE in line),
                  "?")
    return {"run": name, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "encoders_before_step_1": loaded}


def tiny_runs() -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="cogft-host-memory-") as folder:
        root = Path(folder)
        return [measure(root, "cold"), measure(root, "warm"), measure(root, "warm-eager", eager=True)]


# -- real size ----------------------------------------------------------------------------------------
def nbytes(module: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """The bytes of `module`'s parameters and buffers in `dtype`; the modules transformers' `from_pretrained` keeps in
    fp32 at that dtype in fp32 (`_keep_in_fp32_modules_strict`, and `_keep_in_fp32_modules` in fp16 only: T5's `wo`
    stays bf16 in bf16, transformers 5.23 `_get_dtype_plan`)."""
    keep = set(getattr(module, "_keep_in_fp32_modules_strict", None) or ())
    if dtype == torch.float16:
        keep |= set(getattr(module, "_keep_in_fp32_modules", None) or ())
    total = 0
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            total += tensor.numel() * tensor.element_size()
        elif keep & set(name.split(".")):
            total += tensor.numel() * 4
        else:
            total += tensor.numel() * torch.empty((), dtype=dtype).element_size()
    return total


def t5_xxl():
    """THUDM/CogVideoX-2b, -5b and 1.5-5B text_encoder/config.json: the T5 v1.1 XXL encoder."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                                   feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False))


def glm4_9b():
    """THUDM/CogView4-6B text_encoder/config.json: GLM-4-9B (`GlmModel`, no LM head)."""
    from transformers import GlmConfig, GlmModel

    return GlmModel(GlmConfig(vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_hidden_layers=40,
                              num_attention_heads=32, num_key_value_heads=2, head_dim=128, attention_bias=True,
                              partial_rotary_factor=0.5, max_position_embeddings=131072))


def real_components() -> dict[str, dict[str, int]]:
    """Model -> component -> bytes (bf16), each built on the meta device from its published config."""
    from cogvlm_memory import COGVLM_17B
    from cogvideox_step import REAL
    from diffusers import AutoencoderKL, AutoencoderKLCogVideoX, CogVideoXTransformer3DModel, CogView4Transformer2DModel
    from gpu_models import COGVIEW4_6B, COGVIEW4_VAE

    from recipes.cogvlm import CogVLMConfig, CogVLMForCausalLM

    table: dict[str, dict[str, int]] = {}
    with torch.device("meta"):
        t5, cogvideox_vae = nbytes(t5_xxl()), nbytes(AutoencoderKLCogVideoX())  # the VAE: the class defaults
        for label, size in (("CogVideoX-2B", "2b"), ("CogVideoX-5B", "5b"), ("CogVideoX1.5-5B", "1.5-5b")):
            spec = {k: v for k, v in REAL[size].items() if k != "snr"}
            table[label] = {"transformer": nbytes(CogVideoXTransformer3DModel(**spec)), "vae": cogvideox_vae,
                            "text_encoder": t5}
        table["CogView4-6B"] = {"transformer": nbytes(CogView4Transformer2DModel(**COGVIEW4_6B)),
                                "vae": nbytes(AutoencoderKL(**COGVIEW4_VAE)), "text_encoder": nbytes(glm4_9b())}
        cogvlm = CogVLMForCausalLM(CogVLMConfig(**COGVLM_17B))
        vision = sum(nbytes(m) for n, m in cogvlm.named_modules() if n.endswith(".vision") or n == "vision")
        table["CogVLM-17B"] = {"vision": vision, "language": nbytes(cogvlm) - vision}
    return table


def per_rank(table: dict[str, dict[str, int]]) -> list[dict]:
    rows = []
    for model, components in table.items():
        encoders = sum(v for k, v in components.items() if k in ("vae", "text_encoder"))
        rows.append({"model": model, **{k: round(v / 1e9, 2) for k, v in components.items()},
                     "eager_host_gb_per_rank": round(encoders / 1e9, 2), "lazy_warm_host_gb_per_rank": 0.0,
                     "eager_8_ranks_gb": round(8 * encoders / 1e9, 1)})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-only", action="store_true", help="the real-size bytes only, no tiny runs")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--eager", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.child:
        child(args.eager, args.overrides)
        return {}
    result = {"real_size_gb": per_rank(real_components())}
    for row in result["real_size_gb"]:
        parts = ", ".join(f"{k} {v}" for k, v in row.items() if k not in ("model",))
        print(f"{row['model']:>16}: {parts}")
    if not args.sizes_only:
        result["tiny_runs"] = tiny_runs()
        for row in result["tiny_runs"]:
            print(f"{row['run']:>12}: peak RSS {row['peak_rss_mib']} MiB; encoders before step 1: "
                  f"{row['encoders_before_step_1']}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
