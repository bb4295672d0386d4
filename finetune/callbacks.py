"""Callbacks written once for every recipe: validation samples, adapter export, run statistics, prediction tables."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from finetune.atomic import atomic_path
from finetune.checkpointing import interrupt_requested
from finetune.ema import ema_weights, validation_weights
from finetune.family import GenerationRequest
from finetune.grids import log_progress
from finetune.guards import TrainingFailed
from finetune.lora_formats.record import engine_record
from finetune.loggers import log_metrics
from finetune.media import log_samples, save_samples
from finetune.quality import quality_warnings, sample_signals


def _run_dir(trainer: L.Trainer) -> Path:
    return Path(trainer.default_root_dir)


def full_parameters(trainer: L.Trainer, module: L.LightningModule):
    """Every rank enters: inside, the module's parameters are whole on every rank (FSDP1 and FSDP2 shard them,
    ZeRO-3 partitions them); for DDP and single-device runs nothing changes. A LoRA needs only its own tensors
    gathered (`finetune.strategies.gathered_parameters`)."""
    from finetune.adapters import LoRA
    from finetune.strategies import gathered_parameters

    return gathered_parameters(trainer, module, frozen=not isinstance(getattr(module, "adapter", None), LoRA))


def generation_requests(prompts: list) -> list[GenerationRequest]:
    """Config entries -> requests: a prompt string, or a mapping with `prompt` and conditioning media (`image`, and
    any other named media, e.g. `control_image`, into `media`)."""
    def request(entry) -> GenerationRequest:
        if isinstance(entry, str):
            return GenerationRequest(entry)
        entry = dict(entry)
        return GenerationRequest(entry.pop("prompt"), entry.pop("image", None), media=entry)

    return [request(p) for p in prompts]


class ValidationSamples(L.Callback):
    """Generate with the real inference pipeline and the current weights at a fixed seed and fixed
    prompts, every `every_n_steps` and at the end; save under `run_dir/samples/step_NNNNNN/` and log
    to W&B as `val/samples`. With several processes the requests are split across the ranks and the samples
    gathered to rank zero, which writes and logs them (`share`).

    Args:
        prompts: the validation prompts (the same every time, so samples are comparable): strings, or mappings
            `{prompt: ..., image: PATH}` for families conditioned on an image (image-to-video), or with other named
            media (`{prompt: ..., control_image: PATH}`: CogView4 control); null: `data_prompts` of the training
            data's own captions (and conditioning images), named in the log (`finetune.validation_prompts`); []: no
            validation samples.
        data_prompts: how many captions `prompts: null` takes from the data.
        every_n_steps: 0 disables the periodic samples (the final ones are still made if `at_end`).
        seed: the generator seed of the first prompt (prompt i uses seed + i).
        generate_kwargs: passed to the family's `generate` (steps, guidance scale, fps).
        baseline: before the first step, generate the same prompts with the same seeds with the adapter off (the
            untrained model) into `run_dir/samples/baseline/`; every validation then logs quality signals against it
            (`val/motion`, `val/saturation`, `val/color_drift`, `val/first_frame_distance`: docs/tracking.md#quality-signals).
        min_motion_ratio: warn of a motion collapse when a video's motion falls below this times the baseline's.
        max_color_drift: warn when a sample's colour histogram distance from its baseline exceeds this.
    """

    setting_ranges = {"min_motion_ratio": "[0, 1]", "max_color_drift": "[0, 1]",
                      "data_prompts": ">=0"}  # checked by finetune.settings.check

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        if self.from_data and stage == "fit" and not self.requests:  # prompts: null
            from finetune.validation_prompts import requests_from_data

            self.requests = requests_from_data(trainer.datamodule, self.data_prompts, _run_dir(trainer))

    def __init__(self, prompts: list | None = None, every_n_steps: int = 0, at_end: bool = True, seed: int = 42,
                 generate_kwargs: dict | None = None, baseline: bool = True, min_motion_ratio: float = 0.3,
                 max_color_drift: float = 0.6, data_prompts: int = 2):
        self.from_data = prompts is None
        self.requests = [] if prompts is None else generation_requests(prompts)
        self.data_prompts = data_prompts
        self.every_n_steps, self.at_end, self.seed = every_n_steps, at_end, seed
        self.generate_kwargs = dict(generate_kwargs or {})
        self.last_step = -1
        self.baseline, self.min_motion_ratio, self.max_color_drift = baseline, min_motion_ratio, max_color_drift
        #: rank zero: the untrained model's samples, one per request (None: no baseline) and their signals
        self.baseline_samples: list | None = None
        self.baseline_signals: list[dict[str, float]] = []

    def _generate(self, trainer: L.Trainer, module: L.LightningModule, adapter_off=None) -> list:
        """Every rank enters; rank zero gets every request's sample in request order, the others []."""
        start, mine = self.share(trainer)
        was_training = module.training
        module.eval()
        # Sampling draws its noise from its own generators; keep the training draws untouched. The pipeline runs
        # the encoders that training from the encoded cache keeps on the CPU: they come to the device meanwhile.
        # The EMA in for the trained samples, if asked (docs/tracking.md#ema); the baseline turns the adapter off.
        weights = adapter_off if adapter_off is not None else validation_weights(trainer, module)
        # A module without `generation_inputs` (another LightningModule) runs its family's encoders as they are.
        inputs = getattr(module, "generation_inputs", lambda requests: contextlib.nullcontext(requests))
        with (weights, self._whole_weights(trainer, module), inputs(mine) as mine,
              torch.random.fork_rng(devices=[]), torch.no_grad()):
            samples = module.family.generate(mine, seed=self.seed + start, **self.generate_kwargs) if mine else []
        module.train(was_training)
        return gather_to_rank_zero(trainer, samples, sharded=self.splits(trainer))

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        # Before the module's `setup`: the encode-once pass encodes the prompts with the samples, so that validation
        # reads their embeddings from the cache and needs no text encoder (docs/memory.md#lazy-encoders).
        cache = getattr(module, "cache", None)
        if hasattr(cache, "expect_prompts"):
            cache.expect_prompts([request.prompt for request in self.requests])

    def _sample(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self.last_step or not self.requests:
            return
        self.last_step = step
        samples = self._generate(trainer, module)
        if trainer.is_global_zero:
            self._write(trainer, samples, step)
            self._report(trainer, samples, step)
        trainer.strategy.barrier()

    # -- quality signals against the untrained model (docs/tracking.md#quality-signals) -------------------------

    def _baseline_record(self) -> dict:
        """What the baseline was drawn with: a saved one is reused only when all of it matches."""
        record = {"prompts": [r.prompt for r in self.requests],
                  "images": [None if r.image is None else str(r.image) for r in self.requests],
                  "seed": self.seed, "generate_kwargs": {k: self.generate_kwargs[k] for k in sorted(self.generate_kwargs)}}
        if any(r.media for r in self.requests):  # other named media (control images)
            record["media"] = [{k: str(v) for k, v in sorted(r.media.items())} for r in self.requests]
        return record

    def on_train_start(self, trainer, module) -> None:
        """The baseline, before step 1: drawn with the adapter off; after a resume past step 0 the saved one
        (`samples/baseline/`), else drawn again where the adapter can be switched off (a LoRA; not a full
        finetune, whose untrained weights are gone)."""
        if not (self.baseline and self.requests):
            return
        step, directory = trainer.global_step, _run_dir(trainer) / "samples" / "baseline"
        loaded = None
        if step > 0 and trainer.is_global_zero:
            loaded = load_baseline(directory, self._baseline_record(), len(self.requests))
        if step > 0 and trainer.strategy.broadcast(loaded is not None, src=0):
            self._set_baseline(loaded)
            rank_zero_info(f"validation baseline: {directory} (the untrained model's samples)")
            return
        if not module.adapter.can_disable(step):
            rank_zero_info(f"validation baseline: none ({directory} is missing and a full finetune resumed at step "
                           f"{step} has no untrained weights left); colour drift and the motion check are off")
            return
        samples = self._generate(trainer, module, module.adapter.disabled(module.family.trainable_module(), step))
        if trainer.is_global_zero:
            paths = save_samples(samples, directory)
            (directory / "baseline.json").write_text(json.dumps(self._baseline_record(), indent=1), encoding="utf-8")
            self._set_baseline(samples)
            metrics = mean_per_prompt({f"baseline_{k}": v for k, v in s.items()} for s in self.baseline_signals)
            if metrics:
                log_metrics(trainer, metrics, step)
            rank_zero_info(f"validation baseline (the untrained model): {paths[0].parent if paths else '-'}")
        trainer.strategy.barrier()

    def _set_baseline(self, samples: list) -> None:
        self.baseline_samples = samples
        self.baseline_signals = [sample_signals(s.kind, s.data, s.condition) for s in samples]

    def _report(self, trainer: L.Trainer, samples: list, step: int) -> None:
        """Rank zero: log each sample's quality signals and their means under `val/`, and warn of a motion collapse
        or colour drift against the baseline."""
        baseline = self.baseline_samples if self.baseline_samples and len(self.baseline_samples) == len(samples) \
            else None
        signals = []
        for i, sample in enumerate(samples):
            base = baseline[i] if baseline else None
            found = sample_signals(sample.kind, sample.data, sample.condition,
                                   base.data if base is not None and base.kind == sample.kind else None)
            signals.append(found)
            if base is not None:
                for message in quality_warnings(found, self.baseline_signals[i], self.min_motion_ratio,
                                                self.max_color_drift, label=f"step {step}, prompt {i}"):
                    rank_zero_warn(message)
        metrics = mean_per_prompt(signals)
        if metrics:
            log_metrics(trainer, metrics, step)

    def share(self, trainer: L.Trainer) -> tuple[int, list[GenerationRequest]]:
        """This rank's requests (a contiguous run, so request i keeps seed + i whichever rank makes it) and the index
        of its first. Replicated weights (single device, DDP, ZeRO-1/2): the requests are split across ranks, at
        most one generation apart, so no rank waits long at the gather. Sharded weights (FSDP, FSDP2, ZeRO-3): every
        rank makes every request in step with the others, since their forwards are collectives."""
        world, rank = trainer.world_size, trainer.global_rank
        if not self.splits(trainer):
            return 0, list(self.requests)
        base, extra = divmod(len(self.requests), world)
        start = rank * base + min(rank, extra)
        return start, list(self.requests[start: start + base + (rank < extra)])

    @staticmethod
    def splits(trainer: L.Trainer) -> bool:
        """Whether the requests are split across ranks (several processes, each with whole weights)."""
        from finetune.strategies import parameters_sharded

        return trainer.world_size > 1 and not parameters_sharded(trainer.strategy)

    @staticmethod
    def _whole_weights(trainer: L.Trainer, module: L.LightningModule):
        from finetune.strategies import forward_is_collective

        if forward_is_collective(trainer.strategy):  # FSDP2 gathers each block in its own forward
            return contextlib.nullcontext()
        return full_parameters(trainer, module)

    def _write(self, trainer: L.Trainer, samples, step: int) -> None:
        paths = save_samples(samples, _run_dir(trainer) / "samples" / f"step_{step:06d}")
        log_samples(trainer.loggers, samples, paths, step)
        rank_zero_info(f"validation samples for step {step}: {paths[0].parent if paths else '-'}")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            if interrupt_requested() and trainer.world_size == 1:  # stopping: the checkpoint comes first
                rank_zero_info(f"validation samples for step {trainer.global_step} skipped: the run is stopping")
                return
            self._sample(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if self.at_end:
            self._sample(trainer, module)
        if trainer.is_global_zero:  # every validation so far, this run's and those before a resume: progress.png
            log_progress(trainer.loggers, _run_dir(trainer) / "samples", trainer.global_step)


def mean_per_prompt(signals) -> dict[str, float]:
    """[{name: value} per prompt] -> `val/<name>/NN` per prompt and `val/<name>`, the mean over the prompts that
    have it."""
    metrics, values = {}, {}
    for i, found in enumerate(signals):
        for name, value in found.items():
            metrics[f"val/{name}/{i:02d}"] = value
            values.setdefault(name, []).append(value)
    metrics.update({f"val/{name}": sum(v) / len(v) for name, v in values.items()})
    return metrics


def load_baseline(directory: Path, record: dict, count: int) -> list | None:
    """The baseline samples `on_train_start` saved in `directory`, if they were drawn with `record` (prompts,
    images, seed, generate_kwargs) and all `count` are there; else None. Videos come back decoded from their mp4."""
    from PIL import Image

    from finetune.family import Sample

    try:
        if json.loads((directory / "baseline.json").read_text(encoding="utf-8")) != record:
            return None
        samples = []
        for i, prompt in enumerate(record["prompts"][:count]):
            video, image = directory / f"{i:02d}.mp4", directory / f"{i:02d}.png"
            if video.is_file():
                import av

                with av.open(str(video)) as container:
                    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
                samples.append(Sample("video", frames, prompt))
            elif image.is_file():
                samples.append(Sample("image", Image.open(image).convert("RGB"), prompt))
            else:
                return None
        return samples if len(samples) == count else None
    except (OSError, ValueError):
        return None


def gather_to_rank_zero(trainer: L.Trainer, samples: list, sharded: bool) -> list:
    """Rank zero: every rank's samples in rank order (each rank's a contiguous run of the requests); other ranks:
    []. `sharded=False` (every rank made every request): rank zero's own."""
    dist = torch.distributed
    if trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return samples
    everyone = [None] * trainer.world_size if trainer.is_global_zero else None
    dist.gather_object(samples if sharded else [], everyone, dst=0)
    if not trainer.is_global_zero:
        return []
    return [sample for part in everyone for sample in part] if sharded else samples


class ExportAdapter(L.Callback):
    """Write what was trained in the format inference tools load (`family.export`: e.g. a diffusers LoRA
    file with its rank/alpha metadata, a PEFT adapter folder, or for a full finetune the network in the
    checkpoint's own layout). At the end of training into `run_dir/<dirname>/`, and every `every_n_steps`
    into `run_dir/<dirname>/step_NNNNNN/`. `formats`: LoRA file formats to write side by side (the family's
    `export_formats`, e.g. `[diffusers, comfy]` for CogVideoX: the native ComfyUI file next to the diffusers one);
    None: the family's own only."""

    def __init__(self, dirname: str = "export", every_n_steps: int = 0, formats: list[str] | None = None):
        self.dirname, self.every_n_steps = dirname, every_n_steps
        self.formats = list(formats or [])
        self.written: list[Path] = []

    def setup(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        """Formats the family cannot write stop the run before training, not at its end."""
        from finetune.adapters import LoRA

        if not self.formats:
            return
        family = module.family
        extra = [f for f in self.formats if f not in family.export_formats[:1]]
        unknown = [f for f in extra if f not in family.export_formats]
        if unknown or (extra and not isinstance(module.adapter, LoRA)):
            raise ValueError(f"callbacks.export.formats={self.formats}: {type(family).__name__} with "
                             f"{type(module.adapter).__name__} writes {list(family.export_formats[:1]) or 'its own'}"
                             + (f" and, for a LoRA, {list(family.export_formats[1:])}" if family.export_formats[1:]
                                else "") + "; remove " + ", ".join(unknown or extra) + ".")

    def export(self, trainer: L.Trainer, module: L.LightningModule, directory: Path) -> None:
        """The trained weights into `directory`; with the EMA on (`callbacks.ema`), its weights into `directory/ema/`
        in the same formats (docs/tracking.md#ema)."""
        self._export(trainer, module, directory)
        with ema_weights(trainer, module) as swapped:  # swapped into this rank's shards, gathered by _export
            if swapped:
                self._export(trainer, module, directory / "ema")

    def _export(self, trainer: L.Trainer, module: L.LightningModule, directory: Path) -> None:
        # All ranks gather (a collective under FSDP/ZeRO-3); rank zero writes.
        with full_parameters(trainer, module):
            if trainer.is_global_zero:
                check_finite(module, trainer.global_step)
                # Written into a private folder next to the destination, then moved into place entry by entry:
                # a crash or a full disk leaves the previous export whole, and a reader never sees half of one.
                try:
                    with atomic_path(directory, replace=publish) as staging:
                        staging.mkdir(parents=True)
                        # the engine's part of the record the family keeps in the files (it adds the model's)
                        record = engine_record(module.adapter, module.identity.get("recipe"), trainer.global_step)
                        path = module.family.export(staging, module.adapter, record)
                        extra = [module.family.export_format(staging, module.adapter, fmt, record)
                                 for fmt in self.formats if fmt not in module.family.export_formats[:1]]
                except OSError as err:
                    raise OSError(err.errno, f"could not write the export {directory} ({err.strerror or err}); the "
                                             f"previous export, if any, is kept.") from None
                path = directory / Path(path).relative_to(staging)
                self.written.append(path)
                rank_zero_info(f"exported {type(module.adapter).__name__} to {path}")
                for other in extra:
                    rank_zero_info(f"exported {type(module.adapter).__name__} to {directory / Path(other).name}")
        trainer.strategy.barrier()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.export(trainer, module, _run_dir(trainer) / self.dirname / f"step_{trainer.global_step:06d}")

    def on_train_end(self, trainer, module) -> None:
        self.export(trainer, module, _run_dir(trainer) / self.dirname)


def check_finite(module: L.LightningModule, step: int) -> None:
    """Refuse to export non-finite weights (whatever let them through)."""
    bad = [name for name, p in module.named_parameters() if p.requires_grad and not torch.isfinite(p).all()]
    if bad:
        raise TrainingFailed(f"step {step}: {len(bad)} trained tensors hold NaN/inf (e.g. {bad[0]}); nothing was "
                             f"exported. Lower optimizer.lr and resume from the last good checkpoint.")


def publish(staging: Path, directory: Path) -> None:
    """Move each file and folder of `staging` into `directory`, replacing what is there by rename (other entries,
    e.g. the periodic `step_NNNNNN/` exports, stay)."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        target = directory / entry.name
        if entry.is_dir() and target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            target.rename(old)
            entry.rename(target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(entry, target)


class TrainingStats(L.Callback):
    """Logs throughput (`train/samples_per_sec`, `train/step_time_s`) and memory (`train/peak_memory_gb`:
    CUDA peak allocated on GPU, peak resident set size on CPU) every `log_every_n_steps` optimizer steps (the
    module logs `train/loss` and `train/lr`). Without a logger (`logger=none`) it logs nothing."""

    def __init__(self, log_every_n_steps: int = 10):
        self.log_every_n_steps = log_every_n_steps
        self._start, self._samples, self._from_step = None, 0, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if self._start is None:
            self._start, self._samples, self._from_step = time.perf_counter(), 0, trainer.global_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._samples += len(batch["key"]) * trainer.world_size
        steps = trainer.global_step - self._from_step
        if steps < self.log_every_n_steps:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        metrics = {"train/samples_per_sec": self._samples / elapsed, "train/step_time_s": elapsed / steps,
                   "train/peak_memory_gb": _peak_memory_gb(module.device)}
        log_metrics(trainer, metrics, trainer.global_step - 1)  # the index of the window's last step, as its loss
        self._start = None


def _peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class PredictionsTable(L.Callback):
    """Per-sample results of validation and test (the rows of `family.evaluate`: key, label, prediction, scores)
    with the batch's `preview` images: all rows written to `run_dir/predictions/<split>_step_NNNNNN.tsv`, the first
    `max_images` with their image logged to W&B as the table `<split>/predictions` (other loggers get only the
    metrics), and the epoch's mean scores printed.
    """

    def __init__(self, max_images: int = 32):
        self.max_images = max_images
        self.rows: list[dict] = []

    def _collect(self, outputs, batch) -> None:
        previews = batch.get("preview") or []
        for i, record in enumerate((outputs or {}).get("rows", [])):
            image = previews[i] if i < len(previews) and len(self.rows) < self.max_images else None
            self.rows.append({**record, "image": image})

    def _write(self, trainer: L.Trainer, split: str) -> None:
        rows, self.rows = self.rows, []
        if not rows or not trainer.is_global_zero:
            return
        step = trainer.global_step
        columns = [c for c in rows[0] if c != "image"]
        path = _run_dir(trainer) / "predictions" / f"{split}_step_{step:06d}.tsv"
        path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["\t".join(columns)] + ["\t".join(str(row[c]) for c in columns) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        scores = {c: sum(float(row[c]) for row in rows) / len(rows) for c in columns
                  if isinstance(rows[0][c], (bool, int, float))}
        summary = ", ".join(f"{split}/{name} {value:.4f}" for name, value in scores.items())
        rank_zero_info(f"step {step}: {summary} on {len(rows)} samples (rank 0); predictions: {path}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                data = [[wandb.Image(row["image"]), *(row[c] for c in columns)]
                        for row in rows[:self.max_images] if row["image"] is not None]
                logger.experiment.log({f"{split}/predictions": wandb.Table(columns=["image", *columns], data=data),
                                       "trainer/global_step": step})

    def on_validation_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, batch)

    def on_test_batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer, module) -> None:
        self._write(trainer, "val")

    def on_test_epoch_end(self, trainer, module) -> None:
        self._write(trainer, "test")
