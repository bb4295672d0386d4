"""The engine's LightningModule: one for every family and every method (LoRA or full finetune)."""

from __future__ import annotations

from typing import Callable, Literal

import lightning as L
import torch

from finetune import rng
from finetune.adapters import Full, LoRA
from finetune.cache import EncodeOnce
from finetune.checkpointing import CheckpointError, identity_differences
from finetune.dropout import CaptionDropout
from finetune.family import ModelFamily
from finetune.guards import TrainingFailed
from finetune.loggers import RunningMean, is_logging_step, log_metrics


class FinetuneModule(L.LightningModule):
    """Connects a model family to Lightning.

    Args:
        family: the model family (loads the checkpoint, owns the objective).
        adapter: `LoRA(...)` or `Full(...)`.
        optimizer: a partial optimizer, called with the trainable parameters.
        lr_scheduler: a partial schedule, called with the optimizer and `total_steps`.
        enable_gradient_checkpointing: recompute activations in backward: less memory, ~30% slower.
        cache: `on`: before training, encode every sample once (the family's `encode`: VAE posterior, text
            embeddings) into `cache_dir`, then train on the cached encodings with the encoders off the accelerator
            (`finetune.cache.EncodeOnce`); `off`: decode and encode every batch each step. Families without a
            `cache_namespace` (no frozen encoder, e.g. CogVLM) and data modules without a `sample_index` always do
            the latter.
        keep_encoders: with encode-once, keep the encoders a cold run loaded (and those validation loaded) in host
            memory, parked on the CPU, between the times they run; false (the default): release them after the
            precompute pass and after each validation, and load them again when a step needs them: a warm cache
            loads no text encoder and no VAE before validation (docs/memory.md#lazy-encoders).
        cache_dir: where the encodings are kept; None: `<kit cache root>/encoded` ($COGFT_CACHE, by default
            ~/.cache/cog-finetune). Runs share it: entries are keyed by everything they depend on.
        seed: the run's seed; with several processes each rank draws from its own stream derived from it
            (`finetune.rng`).
        fp8_base: store the frozen base's layer weights in float8 and upcast each layer as it runs
            (`finetune.memory.fp8_weight_storage`; LoRA only).
        blocks_to_swap: keep the frozen weights of the last N transformer blocks in CPU memory, copied to the
            accelerator block by block (`finetune.memory.BlockSwap`; single device or DDP).
    """

    setting_ranges = {"blocks_to_swap": ">=0"}  # checked by finetune.settings before anything is built

    def __init__(self, family: ModelFamily, adapter: LoRA | Full, optimizer: Callable,
                 lr_scheduler: Callable | None = None, enable_gradient_checkpointing: bool = False,
                 cache: Literal["on", "off"] | bool = "on", cache_dir: str | None = None, seed: int | None = None,
                 fp8_base: bool = False, blocks_to_swap: int = 0, keep_encoders: bool = False):
        super().__init__()
        self.seed = seed
        if fp8_base:  # before the LoRA exists: only the base layers get the float8 storage
            from finetune.memory import fp8_weight_storage

            network = family.trainable_module()
            fp8_weight_storage(network, compute_dtype=next(network.parameters()).dtype)
        self.blocks_to_swap, self.block_swap = int(blocks_to_swap), None
        self.family = family
        self.adapter = adapter
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        adapter.apply(family.trainable_module(), family.lora_target_modules)
        if enable_gradient_checkpointing:
            family.enable_gradient_checkpointing()
        self.cache = EncodeOnce(family, cache, cache_dir, keep_encoders)  # encode once: called once from each hook below
        self.caption_dropout: CaptionDropout | None = None  # data.caption_dropout, from `on_fit_start`
        # Checkpoints hold only trainable weights; the frozen base comes from model.path again.
        self.strict_loading = False
        #: what this run trains (recipe, model, adapter, kit version: `finetune.checkpointing.run_identity`)
        self.identity: dict = {}
        self.batches_trained = 0  # in this process (a resumed run starts at 0): a run that trained none failed
        self.train_loss = RunningMean()  # on the device: read on the logging cadence only (`optimizer_step`)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.family.on_train_mode()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def setup(self, stage: str) -> None:
        # The processes are connected and Lightning has seeded them all alike: each rank takes its own stream.
        if self.trainer.world_size > 1 and self.seed is not None:
            rng.seed_rank(self.seed, self.trainer.global_rank)
        # Before the strategy moves (wraps, shards) the module: the encoders only the precompute pass needs leave it.
        self.cache.setup(self.trainer, stage)

    def on_fit_start(self) -> None:
        # After the strategy set up (the module on its device, the processes connected), before any batch is loaded.
        fraction = getattr(self.trainer.datamodule, "caption_dropout", 0) or 0  # data.caption_dropout
        self.caption_dropout = CaptionDropout(fraction, self.family.prompt_keys, self.seed, self.trainer.global_rank,
                                              type(self.family).__name__) if fraction else None
        self.cache.on_fit_start(self, self.family.prompt_keys if fraction else ())
        if self.caption_dropout is not None:
            self.caption_dropout.empty = self.cache.empty_prompt
        if self.blocks_to_swap and self.block_swap is None:
            from finetune.memory import swap_blocks
            from finetune.strategies import parameters_sharded

            if parameters_sharded(self.trainer.strategy):
                raise ValueError("module.blocks_to_swap with a sharded strategy (fsdp, fsdp2, deepspeed_zero3): the "
                                 "strategy already streams the weights; use one of the two.")
            self.block_swap = swap_blocks(self.family, self.blocks_to_swap, self.device)

    def teardown(self, stage: str) -> None:
        self.cache.teardown()
        if self.block_swap is not None:
            self.block_swap.remove(self.device)
            self.block_swap = None

    def configure_model(self) -> None:
        # Only `strategy=fsdp2` (finetune.strategies.FSDP2Strategy) gives the module a device mesh: shard the family's
        # transformer blocks with `fully_shard`. Other strategies wrap or replicate the module themselves.
        mesh = getattr(self, "_device_mesh", None)
        if mesh is not None:
            from finetune.strategies import shard_family

            shard_family(self.family, mesh, **getattr(self.trainer.strategy, "fully_shard_options", {}))

    def encoders_on_device(self):
        """The family's encoders that training from the encoded cache keeps on the CPU, on this module's device while
        they run (validation samples), back on the CPU afterwards."""
        return self.cache.encoders_on_device(self.device)

    def generation_inputs(self, requests: list):
        """Validation sampling's requests with their prompts' cached embeddings, and the components the family's
        `generate` runs on this module's device meanwhile (`finetune.cache.EncodeOnce.generation_inputs`)."""
        return self.cache.generation_inputs(requests, self.device)

    def encode(self, batch: dict) -> dict:
        """The family's encodings of a batch: the batch itself when it was read from the encoded cache."""
        return self.cache.encode(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        dropout = getattr(self, "caption_dropout", None)
        if dropout is None:
            encoded = self.encode(batch)
        else:  # data.caption_dropout: drawn from the seed, the step and the batch (finetune/dropout.py)
            draw = self.trainer.global_step * 100_003 + batch_idx
            encoded = dropout.drop_encoded(self.encode(batch), draw) if self.cache.serving else \
                self.encode(dropout.drop_prompts(batch, draw))
        loss = self.family.training_loss(encoded)
        # Not `self.log`: Lightning's result collection costs ~1 ms of Python a step, and its progress-bar copy reads
        # the loss back from the device (a host-device sync) every step. Logged on the cadence in `optimizer_step`.
        self.train_loss.add(loss)
        return loss

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        step = self.trainer.global_step  # this step's index: Lightning counts the step after this hook
        if is_logging_step(self.trainer, step):
            self.log_train_loss(step)

    def log_train_loss(self, step: int) -> None:
        """`train/loss` (the mean loss of the steps since the last logged one) and `train/lr` (the rate this step
        used; its scheduler steps after it) to the loggers and, before the callbacks' `on_train_batch_end`, the loss
        to the progress bar and `trainer.callback_metrics` (checkpoint monitors)."""
        loss = self.train_loss.pop()
        if loss is None:
            return
        trainer = self.trainer
        log_metrics(trainer, {"train/loss": loss, "train/lr": float(trainer.optimizers[0].param_groups[0]["lr"])},
                    step)
        trainer.progress_bar_metrics["train/loss"] = loss
        trainer.callback_metrics["train/loss"] = torch.tensor(loss)

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.batches_trained += 1
        if self.block_swap is not None:
            self.block_swap.release()

    def on_fit_end(self) -> None:
        # Here, in the process that trained (also under ddp_spawn), after the export: a run that trained no
        # batch fails instead of looking done.
        if self.batches_trained == 0:
            raise TrainingFailed(f"no batch was trained (global step {self.trainer.global_step} of "
                                 f"trainer.max_steps={self.trainer.max_steps}): the data gave no batches, or the "
                                 f"resumed checkpoint had already reached max_steps (raise it to continue).")

    def validation_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("val", batch)

    def test_step(self, batch: dict, batch_idx: int) -> dict:
        return self._evaluate("test", batch)

    def _evaluate(self, split: str, batch: dict) -> dict:
        """Logs the family's metrics; its per-sample rows reach callbacks as the step's `outputs["rows"]`."""
        result = self.family.evaluate(batch)
        for name, value in result.metrics.items():
            self.log(f"{split}/{name}", value, batch_size=len(batch["key"]), sync_dist=True)
        return {"rows": result.rows}

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer_factory(params)
        if self.lr_scheduler_factory is None:
            return optimizer
        total = self.trainer.estimated_stepping_batches if self.trainer else 1
        scheduler = self.lr_scheduler_factory(optimizer, total_steps=int(total))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "train/lr"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["cogft"] = self.identity  # what it was trained for: checked when it is loaded
        # The noise and timestep draws continue exactly where they stopped after a resume: every rank's stream
        # (a collective: every rank builds the checkpoint dict, the strategy writes it once).
        checkpoint["rng_state"] = rng.checkpoint_entry(self.trainer.strategy if self._trainer else None)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        differences = identity_differences(checkpoint.get("cogft", {}), self.identity)
        if differences:
            raise CheckpointError("the checkpoint was trained for something else: " + "; ".join(differences)
                                  + ". Pass the matching recipe and settings, or another ckpt_path.")
        expected = self.trainable_state_dict()
        if "state_dict" not in checkpoint:  # fsdp2, deepspeed: the strategy loaded the weights into the model itself
            checkpoint["state_dict"] = {}
            expected = {}
        missing = set(expected) - set(checkpoint["state_dict"])
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                                  f"it was written for a different adapter or model; check adapter.* and model.path")
        for name, saved in checkpoint["state_dict"].items():
            if name in expected and saved.shape != expected[name].shape:
                raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(saved.shape)}, this run's "
                                      f"{tuple(expected[name].shape)}: it was trained with other adapter settings "
                                      f"(e.g. adapter.rank); pass the settings it was trained with.")
        trainer = self._trainer
        rng.restore_from_checkpoint(checkpoint.get("rng_state"), self.seed, trainer.global_rank if trainer else 0,
                                    trainer.world_size if trainer else 1, int(checkpoint.get("global_step", 0)))

