"""The kit's training step through the Trainer versus a bare PyTorch loop doing the same math.

    OMP_NUM_THREADS=1 python bench/step_overhead.py                      # both sizes, 7 interleaved rounds each
    OMP_NUM_THREADS=2 python bench/step_overhead.py --sizes 25ms --pairs 9 --threads 2
    OMP_NUM_THREADS=1 python bench/step_overhead.py --logger wandb --override trainer.log_every_n_steps=1

Both sides build the model from the composed tiny CogVideoX LoRA recipe (`recipe=cogvideox_lora preset=tiny`,
scaled in frames / height / width / batch to a ~25 ms and a ~100 ms step on one CPU thread) and train on the same
encoded batch (VAE posterior + T5 embeddings, computed once by the family's encoders): the step of a run that reads
its encodings from the encoded cache.

- kit: `finetune.run.build` (the real `FinetuneModule`, callbacks, logger and trainer settings of the composed
  config) and `trainer.fit`, the data module replaced by one that serves the encoded samples from memory through
  the loader the kit's data modules use (`StatefulDataLoader`, the processor's collate). Periodic work a bare loop
  does not do at all (validation samples, checkpoints) is moved past the timed steps; logging stays, at its cadence.
- bare: the same module's `family.training_loss`, `backward`, `clip_grad_norm_` (trainer.gradient_clip_val), the
  recipe's AdamW and LR schedule, `zero_grad(set_to_none=True)`, in a `for` loop.

Each run is its own process; kit and bare runs alternate (kit, bare, bare, kit, ...), and the reported ratio is the
median of the rounds' kit/bare ratios. A step's time runs from one batch's start to the next (all the loop's work
between steps counts), averaged over the timed steps after a warm-up, in wall time, in the process's CPU time, and
outside the step's math (`overhead`: the forward and loss, backward, clipping and the optimizer's update are timed
and subtracted). The kit's overhead minus the bare loop's (`adds`) barely moves when other jobs share the machine,
while the ratios scatter by a few percent. `--against DIR` times the kit of another checkout in the same rounds
(copy this file into its bench/ first): a before/after comparison.
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
sys.path.insert(0, str(REPO))

# name: (frames, height, width, batch) of the tiny CogVideoX: ~6 ms, ~25 ms and ~100 ms steps on one CPU thread
SIZES = {"tiny": (9, 32, 32, 1), "25ms": (17, 128, 128, 4), "100ms": (33, 160, 160, 4)}
DEFAULT_STEPS = {"tiny": 300, "25ms": 200, "100ms": 50}  # ~5 s of timed steps


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def recipe_config(size: str, steps: int, run_dir: str, logger: str, overrides=()):
    frames, height, width, batch = SIZES[size]
    return compose(["recipe=cogvideox_lora", "preset=tiny", f"logger={logger}", f"run_dir={run_dir}",
                    f"model.num_frames={frames}", f"model.height={height}", f"model.width={width}",
                    f"data.batch_size={batch}", f"trainer.max_steps={steps}",
                    # periodic work a bare loop does not do: after the timed steps
                    "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false",
                    f"callbacks.checkpoint.every_n_train_steps={10 * steps}", *overrides])


def encoded_samples(module, size: str) -> list[dict]:
    """One batch of encoded samples (the family's own encoders on a seeded random video), split per sample."""
    import torch

    frames, height, width, batch = SIZES[size]
    generator = torch.Generator().manual_seed(0)
    video = torch.rand(batch, frames, 3, height, width, generator=generator) * 2 - 1
    encoded = module.family.encode({"video": video, "prompt": ["a red circle moves left"] * batch})
    return [{**{name: value[i] for name, value in encoded.items()}, "key": f"sample-{i}"} for i in range(batch)]


def encoded_data(samples: list[dict], batch_size: int):
    """A data module serving the encoded samples in order, forever, through the loader the kit's data modules use."""
    import lightning as L
    import torch
    from torchdata.stateful_dataloader import StatefulDataLoader

    from finetune.data import Processor

    class Repeat(torch.utils.data.Dataset):
        def __len__(self):
            return 10**6

        def __getitem__(self, index):
            return samples[index % len(samples)]

    class EncodedData(L.LightningDataModule):
        def train_dataloader(self):
            return StatefulDataLoader(Repeat(), batch_size=batch_size, collate_fn=Processor().collate)

    return EncodedData()


class ComputeClock:
    """Seconds spent in the step's math (the forward and loss, backward, gradient clipping, the optimizer's update),
    counted by wrapping those functions while it is entered: the rest of a step is the loop's own overhead, and the
    kit's overhead minus the bare loop's is a figure that other jobs on the machine barely move."""

    def __init__(self, family):
        self.family, self.seconds = family, 0.0

    def _timed(self, function):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start

        return timed

    def __enter__(self):
        import importlib

        import torch

        adam = importlib.import_module("torch.optim.adam")  # AdamW's update (torch.optim hides the submodule's name)
        self.saved = [(torch.autograd, "backward"), (torch.nn.utils, "clip_grad_norm_"), (adam, "adam")]
        self.saved = [(owner, name, getattr(owner, name)) for owner, name in self.saved]
        for owner, name, function in self.saved:
            setattr(owner, name, self._timed(function))
        self.family.training_loss = self._timed(type(self.family).training_loss.__get__(self.family))
        return self

    def __exit__(self, *exc):
        for owner, name, function in self.saved:
            setattr(owner, name, function)
        del self.family.training_loss

    def mark(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), self.seconds


def step_clock(compute: ComputeClock):
    """A callback noting the time (wall, CPU, in the math) at every batch start."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self):
            self.starts: list[tuple[float, float, float]] = []

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.starts.append(compute.mark())

    return StepClock()


def use_encoded_batches(module) -> None:
    """The batches are already encoded: the module trains on them as it does on the encoded cache's."""
    if hasattr(module, "reads_encoded"):
        module.reads_encoded = True
    else:  # a kit from before the encoded cache read its batches this way (to compare against it)
        module.encode = lambda batch: batch


def run_kit(size: str, args) -> dict:
    import finetune.run as run

    with tempfile.TemporaryDirectory() as run_dir:
        cfg = recipe_config(size, args.warmup + args.steps + 1, run_dir, args.logger, args.override)
        samples: list = []
        real_build_data, real_build_module = run.build_data, run.build_module

        def build_module(cfg, checkpoint=None):
            module = real_build_module(cfg, checkpoint)
            samples.extend(encoded_samples(module, size))
            use_encoded_batches(module)
            return module

        run.build_data, run.build_module = (lambda cfg, checkpoint=None: encoded_data(samples, SIZES[size][3])), build_module
        try:
            trainer, module, data, _ = run.build(cfg)
        finally:
            run.build_data, run.build_module = real_build_data, real_build_module
        with ComputeClock(module.family) as compute:
            clock = step_clock(compute)
            trainer.callbacks.append(clock)
            try:
                trainer.fit(module, datamodule=data)
            finally:
                run.finish_loggers(trainer)
        return per_step(clock.starts, args.warmup, args.steps)


def run_bare(size: str, args) -> dict:
    import lightning as L
    import torch
    from hydra.utils import instantiate

    from finetune.data import Processor
    from finetune.run import build_module

    cfg = recipe_config(size, args.warmup + args.steps + 1, tempfile.gettempdir(), "none")
    L.seed_everything(cfg.seed, verbose=False)
    module = build_module(cfg)
    encoded = Processor().collate(encoded_samples(module, size))
    module.train()
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = instantiate(cfg.optimizer)(params)
    scheduler = instantiate(cfg.lr_scheduler)(optimizer, total_steps=cfg.trainer.max_steps)
    clip = cfg.trainer.gradient_clip_val
    starts = []
    with ComputeClock(module.family) as compute:
        for _ in range(args.warmup + args.steps + 1):
            starts.append(compute.mark())
            optimizer.zero_grad(set_to_none=True)
            loss = module.family.training_loss(encoded)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            scheduler.step()
    return per_step(starts, args.warmup, args.steps)


def per_step(starts: list[tuple[float, float, float]], warmup: int, steps: int) -> dict:
    """Seconds per step over the timed steps: wall, CPU (this process, all threads), and the wall time outside the
    step's math (`overhead`)."""
    (wall0, cpu0, math0), (wall1, cpu1, math1) = starts[warmup], starts[warmup + steps]
    return {"wall": (wall1 - wall0) / steps, "cpu": (cpu1 - cpu0) / steps,
            "overhead": ((wall1 - wall0) - (math1 - math0)) / steps}


def one_run(kind: str, size: str, args) -> dict:
    """Wall and CPU seconds per step of one run, in this process."""
    import torch

    torch.set_num_threads(args.threads)
    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    from finetune.console import quiet_known_warnings

    quiet_known_warnings()
    return run_kit(size, args) if kind == "kit" else run_bare(size, args)


def in_subprocess(kind: str, size: str, args) -> dict:
    """`baseline`: the kit of the checkout `--against` (its own copy of this file), for a before/after comparison."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    script = Path(args.against) / "bench" / Path(__file__).name if kind == "baseline" else Path(__file__)
    kind = "kit" if kind == "baseline" else kind
    command = [sys.executable, str(script), "--child", kind, "--sizes", size, "--warmup", str(args.warmup),
               "--steps", str(args.steps), "--threads", str(args.threads), "--logger", args.logger,
               *(f"--override={o}" for o in args.override)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(script).parents[1])
    if result.returncode:
        raise RuntimeError(f"{kind} run failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def compare(times: dict) -> dict:
    """Per clock: each side's ms per step and its ratio to the bare loop; each side's overhead (ms per step outside
    the math) and the ms it adds to the bare loop's."""
    result = {}
    for clock in ("wall", "cpu"):
        bare = times["bare"][clock]
        result[clock] = {"bare_ms": 1e3 * bare}
        for kind in sorted(times.keys() - {"bare"}):
            result[clock][f"{kind}_ms"] = 1e3 * times[kind][clock]
            result[clock]["ratio" if kind == "kit" else f"{kind}_ratio"] = times[kind][clock] / bare
    result["overhead"] = {f"{kind}_ms": 1e3 * times[kind]["overhead"] for kind in sorted(times)}
    for kind in sorted(times.keys() - {"bare"}):
        result["overhead"][f"{kind}_adds_ms"] = 1e3 * (times[kind]["overhead"] - times["bare"]["overhead"])
    return result


def summary(pairs: list[dict]) -> dict:
    return {f"median_{clock}_{what}": statistics.median(p[clock][what] for p in pairs)
            for clock in pairs[0] for what in pairs[0][clock]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="25ms,100ms", help=f"comma-separated, of {sorted(SIZES)}")
    parser.add_argument("--pairs", type=int, default=7, help="rounds per size (kit and bare interleaved)")
    parser.add_argument("--steps", type=int, default=None, help=f"timed steps per run (default {DEFAULT_STEPS})")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--logger", default="csv", help="the kit's logger: csv | wandb | tensorboard | none")
    parser.add_argument("--override", action="append", default=[], help="another override for the kit's config")
    parser.add_argument("--in-process", action="store_true", help="every run in this process (the tests)")
    parser.add_argument("--against", default=None, help="also time the kit of this checkout (with this file copied "
                                                        "into its bench/), interleaved: a before/after comparison")
    parser.add_argument("--child", choices=["kit", "bare"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = args.sizes.split(",")
    if args.child:
        args.steps = args.steps or DEFAULT_STEPS[sizes[0]]
        result = one_run(args.child, sizes[0], args)
        print(json.dumps(result))
        return result
    run = one_run if args.in_process else in_subprocess
    report = {"threads": args.threads, "logger": args.logger, "overrides": args.override, "sizes": {}}
    for size in sizes:
        size_args = argparse.Namespace(**{**vars(args), "steps": args.steps or DEFAULT_STEPS[size]})
        pairs = []
        kinds = ["kit", "bare"] + (["baseline"] if args.against else [])
        for i in range(args.pairs):
            order = kinds if i % 2 == 0 else kinds[::-1]  # ABBA: drift hits every side alike
            times = {kind: run(kind, size, size_args) for kind in order}
            pairs.append(compare(times))
            print(f"{size} round {i + 1}/{args.pairs}: " + "; ".join(
                f"{clock} " + ", ".join(f"{name} {value:.3f}" for name, value in p.items())
                for clock, p in pairs[-1].items()), file=sys.stderr)
        math_ms = statistics.median(p["wall"]["bare_ms"] - p["overhead"]["bare_ms"] for p in pairs)
        frames, height, width, batch = SIZES[size]
        medians = summary(pairs)
        report["sizes"][size] = {"shape": f"batch {batch} x {frames}x{height}x{width}", "steps": size_args.steps,
                                 "math_ms": math_ms, **medians, "pairs": pairs}
        for kind in kinds[:1] + kinds[2:]:  # the ratio the overheads alone give: steady when the machine is not
            adds, bare = medians[f"median_overhead_{kind}_adds_ms"], medians["median_overhead_bare_ms"]
            report["sizes"][size][f"{kind}_ratio_from_overhead"] = 1 + adds / (math_ms + bare)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
