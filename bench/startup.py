"""The tiny demo's start: from the command to the end of the first optimizer step, phase by phase.

    OMP_NUM_THREADS=1 python bench/startup.py                 # 1 warm-up run (fills the caches), then 5 timed runs
    OMP_NUM_THREADS=1 python bench/startup.py --runs 9 -- logger=csv
    OMP_NUM_THREADS=1 python bench/startup.py --against /tmp/before   # interleaved with another checkout's kit
    OMP_NUM_THREADS=1 python bench/startup.py --floor                 # and with a bare script's least start

Each run is a fresh process doing what `python train.py recipe=cogvideox_lora preset=tiny` does (`hydra.main`, then
`finetune.run.train`), with `trainer.max_steps=2` (its first step is not a logging one, as in the demo), W&B
offline and its own run directory; it prints a timestamp at each phase boundary and the parent subtracts them (the
first from the moment it started the process):

- python: the interpreter's own start, until the command's first line runs
- hydra: importing Hydra and OmegaConf (train.py's imports)
- compose: `hydra.main` composing the config and setting up the job
- imports: `finetune.run` and what it imports (torch, Lightning, ...)
- data check: `build_data` (settings checked, demo data written if missing, every clip decoded once)
- model load: `build_module` (the LoRA target check and the tiny model, built if missing, loaded)
- trainer: callbacks, loggers (W&B's start begins, in the background) and the Trainer
- fit setup: `trainer.fit` until the encode-once pass (datasets, strategy, optimizers)
- precompute: the encode-once pass (`finetune.cache.EncodeOnce.on_fit_start`; every sample read from the warm cache)
- first step: the first batch loaded and the first optimizer step taken

The caches (tiny model, demo videos, encoded samples) live in their own folder (`--cache`, default a temporary
folder), warmed by the first run, so the timed runs measure a warm start.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PHASES = ("python", "hydra", "compose", "imports", "data check", "model load", "trainer", "fit setup", "precompute",
          "first step")
MARK = "STARTUP_MARK"
DEMO = ["recipe=cogvideox_lora", "preset=tiny", "trainer.max_steps=2", "callbacks.samples.at_end=false"]


def mark(name: str) -> None:
    print(f"{MARK} {name} {time.time():.6f}", flush=True)


def instrument(run) -> None:
    """Timestamps at the phase boundaries inside `finetune.run.train` (wrapping the functions it calls)."""

    def after(name: str, function):
        def wrapped(*args, **kwargs):
            result = function(*args, **kwargs)
            mark(name)
            return result

        return wrapped

    run.build_data = after("data check", run.build_data)
    run.build_module = after("model load", run.build_module)
    real_build = run.build

    def build(cfg, **kwargs):
        trainer, module, datamodule, ckpt_path = real_build(cfg, **kwargs)
        trainer.callbacks.append(FirstStep())
        mark("trainer")
        return trainer, module, datamodule, ckpt_path

    run.build = build
    import finetune.cache as cache

    def between_marks(owner, name: str) -> None:
        real = getattr(owner, name)

        def marked(self, *args):
            mark("fit setup")
            real(self, *args)
            mark("precompute")

        setattr(owner, name, marked)

    if hasattr(cache, "EncodeOnce"):  # the encode-once component (a kit from before had FinetuneModule.encode_once)
        between_marks(cache.EncodeOnce, "on_fit_start")
    elif hasattr(run.FinetuneModule, "encode_once"):
        between_marks(run.FinetuneModule, "encode_once")


class FirstStep:
    """Marks the end of the first optimizer step (a Lightning callback, made when Lightning is imported)."""

    def __new__(cls):
        import lightning as L

        class Mark(L.Callback):
            def on_train_batch_start(self, trainer, module, batch, batch_idx):
                mark("batch start")

            def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
                if trainer.global_step == 1:
                    mark("first step")

        return Mark()


def child(overrides: list[str]) -> None:
    mark("python")
    sys.path.insert(0, str(REPO))  # this checkout's kit, also where another one is pip-installed (editable)
    import hydra
    from omegaconf import DictConfig  # noqa: F401  (train.py's imports)

    mark("hydra")

    @hydra.main(config_path=str(REPO / "conf"), config_name="train", version_base="1.3")
    def main(cfg) -> None:
        mark("compose")
        import finetune.run as run

        mark("imports")
        instrument(run)
        run.train(cfg)

    sys.argv = [str(REPO / "train.py"), *overrides]
    main()


# The floor: what the kit's start does at least, as a bare script: import torch and diffusers, load the tiny pipeline
# from the cache, add the LoRA, take one AdamW step on random latents.
FLOOR = """
import os, time, torch
from diffusers import CogVideoXPipeline
pipe = CogVideoXPipeline.from_pretrained(os.environ["COGFT_CACHE"] + "/tiny/cogvideox", dtype=torch.float32)
from peft import LoraConfig
pipe.transformer.add_adapter(LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
optimizer = torch.optim.AdamW([p for p in pipe.transformer.parameters() if p.requires_grad], lr=1e-3)
out = pipe.transformer(hidden_states=torch.randn(1, 3, 16, 4, 4), encoder_hidden_states=torch.randn(1, 16, 32),
                       timestep=torch.tensor([10]), return_dict=False)[0]
out.pow(2).mean().backward()
optimizer.step()
print(time.time())
"""


def floor_run(cache: str, threads: int) -> dict[str, float]:
    env = {**os.environ, "COGFT_CACHE": cache, "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    started = time.time()
    result = subprocess.run([sys.executable, "-c", FLOOR], env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"the floor script failed:\n{result.stderr[-3000:]}")
    return {"total": float(result.stdout.split()[-1]) - started}


def phases(started: float, marks: dict[str, float]) -> dict[str, float]:
    """Seconds per phase; a phase a run does not have (no encode-once pass) is 0."""
    if "fit setup" not in marks:  # no encode-once pass: fit setup ends when the first batch starts
        marks["fit setup"] = marks["precompute"] = marks["batch start"]
    result, before = {}, started
    for name in PHASES:
        result[name] = marks[name] - before
        before = marks[name]
    result["total"] = marks["first step"] - started
    return result


def one_run(cache: str, overrides: list[str], threads: int, script: str = __file__) -> dict[str, float]:
    """One demo start, timed; `script`: this file in another checkout, to time that checkout's kit."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update({"COGFT_CACHE": cache, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1",
                "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"})
    with tempfile.TemporaryDirectory() as run_dir:
        command = [sys.executable, str(script), "--child", "--", *DEMO, f"run_dir={run_dir}", *overrides]
        started = time.time()
        result = subprocess.run(command, env=env, cwd=Path(script).resolve().parents[1], capture_output=True,
                                text=True)
        finished = time.time()
    if result.returncode:
        raise RuntimeError(f"the demo failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    marks = {}
    for line in result.stdout.splitlines():
        if line.startswith(MARK):
            _, rest = line.split(" ", 1)
            name, stamp = rest.rsplit(" ", 1)
            marks.setdefault(name, float(stamp))
    return {**phases(started, marks), "process": finished - started}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="timed runs after the first (which warms the caches)")
    parser.add_argument("--cache", default=None, help="the kit's cache folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--against", default=None, help="also time the kit of this checkout (with this file copied "
                                                        "into its bench/), interleaved: a before/after comparison")
    parser.add_argument("--floor", action="store_true", help="also time a bare script doing the least the start "
                                                               "does (imports, tiny pipeline, LoRA, one step)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="more overrides for the demo command (after --)")
    args = parser.parse_args(argv)
    if args.child:
        child(args.overrides)
        return {}
    scripts = {"kit": __file__}
    if args.against:
        scripts["baseline"] = str(Path(args.against) / "bench" / Path(__file__).name)
    report = {"command": " ".join(["python train.py", *DEMO[:2], *args.overrides]), "threads": args.threads}
    with tempfile.TemporaryDirectory() as scratch:
        caches = {kind: args.cache or str(Path(scratch) / kind) for kind in scripts}
        for kind, script in scripts.items():  # builds what the cache lacks: tiny model, demo data, encodings
            report[f"{kind}_first"] = one_run(caches[kind], args.overrides, args.threads, script)
        runs = {kind: [] for kind in [*scripts, *(["floor"] if args.floor else [])]}
        for i in range(args.runs):  # interleaved, the order alternating
            for kind in (list(runs) if i % 2 == 0 else list(runs)[::-1]):
                if kind == "floor":
                    runs[kind].append(floor_run(caches["kit"], args.threads))
                else:
                    runs[kind].append(one_run(caches[kind], args.overrides, args.threads, scripts[kind]))
    for kind, timed in runs.items():
        report[f"{kind}_runs"] = timed
        if timed:
            report[f"{kind}_median"] = {name: statistics.median(run[name] for run in timed) for name in timed[0]}
    for name in report.get("kit_median", report["kit_first"]):
        print(f"{name:>12}: " + "  ".join(f"{kind} {report.get(f'{kind}_median', report[f'{kind}_first'])[name]:6.2f} s"
                                          for kind in scripts), file=sys.stderr)
    if args.floor and args.runs:
        print(f"{'floor total':>12}: {report['floor_median']['total']:6.2f} s", file=sys.stderr)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
