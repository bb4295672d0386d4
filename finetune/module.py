"""The engine's LightningModule: one for every family and every method (LoRA or full finetune)."""

from __future__ import annotations

from typing import Callable

import lightning as L
import torch

from finetune.adapters import Full, LoRA
from finetune.cache import EncodedCache
from finetune.checkpointing import CheckpointError, identity_differences
from finetune.family import ModelFamily
from finetune.guards import TrainingFailed


class FinetuneModule(L.LightningModule):
    """Connects a model family to Lightning.

    Args:
        family: the model family (loads the checkpoint, owns the objective).
        adapter: `LoRA(...)` or `Full(...)`.
        optimizer: a partial optimizer, called with the trainable parameters.
        lr_scheduler: a partial schedule, called with the optimizer and `total_steps`.
        enable_gradient_checkpointing: recompute activations in backward: less memory, ~30% slower.
        cache_dir: if set, keep the frozen encoders' outputs on disk (see `finetune.cache`).
    """

    def __init__(self, family: ModelFamily, adapter: LoRA | Full, optimizer: Callable,
                 lr_scheduler: Callable | None = None, enable_gradient_checkpointing: bool = False,
                 cache_dir: str | None = None):
        super().__init__()
        self.family = family
        self.adapter = adapter
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        adapter.apply(family.trainable_module(), family.lora_target_modules)
        if enable_gradient_checkpointing:
            family.enable_gradient_checkpointing()
        self.cache = EncodedCache(cache_dir, family.cache_namespace()) if cache_dir else None
        # Checkpoints hold only trainable weights; the frozen base comes from model.path again.
        self.strict_loading = False
        #: what this run trains (recipe, model, adapter, kit version: `finetune.checkpointing.run_identity`)
        self.identity: dict = {}
        self.batches_trained = 0  # in this process (a resumed run starts at 0): a run that trained none failed

    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            self.family.on_train_mode()
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        names = {name for name, p in self.named_parameters() if p.requires_grad}
        return {k: v for k, v in self.state_dict().items() if k in names}

    def encode(self, batch: dict) -> dict:
        if self.cache is not None:
            return self.cache.get_or_encode(batch, self.family.encode)
        return self.family.encode(batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.family.training_loss(self.encode(batch))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["key"]))
        return loss

    def on_train_batch_end(self, outputs, batch: dict, batch_idx: int) -> None:
        self.batches_trained += 1

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
        # The noise and timestep draws continue exactly where they stopped after a resume.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        differences = identity_differences(checkpoint.get("cogft", {}), self.identity)
        if differences:
            raise CheckpointError("the checkpoint was trained for something else: " + "; ".join(differences)
                                  + ". Pass the matching recipe and settings, or another ckpt_path.")
        expected = self.trainable_state_dict()
        missing = set(expected) - set(checkpoint["state_dict"])
        if missing:
            raise CheckpointError(f"checkpoint lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]}): "
                                  f"it was written for a different adapter or model; check adapter.* and model.path")
        for name, saved in checkpoint["state_dict"].items():
            if name in expected and saved.shape != expected[name].shape:
                raise CheckpointError(f"checkpoint tensor {name} has shape {tuple(saved.shape)}, this run's "
                                      f"{tuple(expected[name].shape)}: it was trained with other adapter settings "
                                      f"(e.g. adapter.rank); pass the settings it was trained with.")
        rng = checkpoint.get("rng_state")
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
