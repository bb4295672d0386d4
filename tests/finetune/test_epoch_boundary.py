"""The data order across epochs, through Lightning's fit loop and torchdata's `StatefulDataLoader` as training runs
it: every epoch is reshuffled, and a run resumed from a checkpoint written at any step -- mid-epoch, at an epoch's
last batch, at the next epoch's first -- goes on with exactly the batches (and epoch numbers) of the uninterrupted
run. With and without loader workers (which start drawing batches before Lightning's `set_epoch`).

Lightning calls `set_epoch` on `loader.sampler` and `loader.batch_sampler.sampler`, never on a batch sampler itself,
and stops each epoch after `len(loader)` batches without asking the sampler for more: a sampler that moved to the next
epoch only when its iterator ran out repeated epoch 0's order in every epoch of an uninterrupted run, while a run
resumed at the boundary moved on."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from datamodules.buckets import BucketBatchSampler
from datamodules.images import ImageDataModule
from datamodules.sampling import ResumableShuffle
from datamodules.video_buckets import VideoBatchSampler
from finetune.data import ImageSpec, Processor

SIZE, BATCH, EPOCHS = 8, 2, 3


class Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return SIZE

    def __getitem__(self, index: int) -> dict:
        return {"key": f"sample-{index}", "x": torch.tensor([float(index)])}


def collate(samples: list[dict]) -> dict:
    return {"key": [s["key"] for s in samples], "x": torch.stack([s["x"] for s in samples])}


def image_loader(workers: int) -> StatefulDataLoader:
    """The image data module's own loader (aspect buckets), on its generated demo set."""
    data = ImageDataModule(root="demo", batch_size=BATCH, seed=3, demo_count=SIZE, num_workers=workers)
    data.connect(Processor(ImageSpec(pixels=4096, min_side=32, max_side=64, multiple=32, max_pixels=4096)))
    data.setup()
    return data.train_dataloader()


def loader(kind: str, workers: int):
    options = {"num_workers": workers, "persistent_workers": workers > 0, "collate_fn": collate}
    if kind == "images":
        return image_loader(workers)
    if kind == "sampler":  # the captcha data module's loader: a sampler, batched by the loader
        return StatefulDataLoader(Indices(), batch_size=BATCH, sampler=ResumableShuffle(SIZE, seed=4), **options)
    batch_samplers = {
        "video buckets": VideoBatchSampler([(9, 32, 32)] * 6 + [(9, 32, 48)] * 2, BATCH, seed=1),  # two buckets
        "one video bucket": VideoBatchSampler([(9, 32, 32)] * SIZE, BATCH, seed=1),  # ResumableShuffle's, in batches
        "bucket sampler": BucketBatchSampler([(1, 2)] * 4 + [(2, 1)] * 4, BATCH, seed=2),
    }
    return StatefulDataLoader(Indices(), batch_sampler=batch_samplers[kind], **options)


class Recorder(L.LightningModule):
    def __init__(self, make_loader):
        super().__init__()
        self.make_loader, self.seen = make_loader, []
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def train_dataloader(self):
        return self.make_loader()

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, tuple(batch["key"])))
        return self.weight.sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def fit(make_loader, run_dir, steps: int, resume_from: int | None = None) -> list:
    module = Recorder(make_loader)
    callbacks = [] if resume_from is not None else [
        L.pytorch.callbacks.ModelCheckpoint(dirpath=run_dir, filename="{step}", every_n_train_steps=1, save_top_k=-1)]
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=resume_from is None, callbacks=callbacks,
                        use_distributed_sampler=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, ckpt_path=None if resume_from is None else str(run_dir / f"step={resume_from}.ckpt"))
    return module.seen


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["images", "video buckets", "one video bucket", "bucket sampler", "sampler"])
def test_every_epoch_reshuffles_and_a_resume_at_any_step_continues_exactly(tmp_path, kind, workers):
    make = lambda: loader(kind, workers)  # noqa: E731
    per_epoch = len(make())
    seen = fit(make, tmp_path, EPOCHS * per_epoch)
    assert [epoch for epoch, _ in seen] == [step // per_epoch for step in range(EPOCHS * per_epoch)]
    epochs = [[key for _, keys in seen[e * per_epoch: (e + 1) * per_epoch] for key in keys] for e in range(EPOCHS)]
    assert all(len(keys) == len(set(keys)) == SIZE for keys in epochs)  # every sample once an epoch
    assert len({tuple(keys) for keys in epochs}) == EPOCHS, "an epoch repeats another epoch's order"
    # before, at and after the end of epoch 0; at the end of epoch 1
    for step in (per_epoch - 1, per_epoch, per_epoch + 1, 2 * per_epoch):
        resumed = fit(make, tmp_path, EPOCHS * per_epoch, resume_from=step)
        assert resumed == seen[step:], f"resumed from step {step}"


@pytest.mark.slow
def test_two_processes_resumed_at_the_epoch_boundary_continue_exactly(tmp_path):
    """The tiny CogVideoX LoRA on two processes (`ddp_spawn`), 4 demo clips, a batch of 1 each: 2 steps an epoch. 4
    steps straight == resumed from the checkpoint written at step 2, the last batch of epoch 0 (same losses, same
    adapter), and epoch 1 gives the ranks other clips than epoch 0 (so reading epoch 0's order again would show). The
    checkpoint holds both ranks' random streams, and they differ; the resumed ranks continue each its own.
    (Resuming mid-epoch: tests/finetune/test_distributed.py's fsdp2 test and the single-process cases above.)"""
    from conftest import compose
    from test_distributed import adapter, assert_same_adapter, losses, overrides

    from finetune.run import train

    for rank in range(2):  # the demo clips share one bucket: ResumableShuffle's order with the run's seed, 42
        sampler = VideoBatchSampler([(9, 32, 32)] * 4, 1, seed=42, num_replicas=2, rank=rank)
        assert sampler.rank_batches(0) != sampler.rank_batches(1)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ddp = ["strategy=ddp_spawn", "trainer.devices=2", "data.demo_count=4", "data.batch_size=1",
           "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_top_k=-1"]
    train(compose(overrides(straight, *ddp)))
    boundary = next((straight / "checkpoints").glob("*step=2.ckpt"))
    checkpoint = torch.load(boundary, map_location="cpu", weights_only=True)
    assert checkpoint["epoch"] == 0
    streams = checkpoint["rng_state"]["per_rank"]  # each rank's own noise stream, both saved (finetune/rng.py)
    assert len(streams) == 2 and not torch.equal(streams[0]["torch"], streams[1]["torch"])
    train(compose(overrides(resumed, *ddp, f"ckpt_path='{boundary}'")))
    first, second = losses(straight), losses(resumed)
    assert sorted(first) == [0, 1, 2, 3] and sorted(second) == [2, 3]
    for step in (2, 3):
        assert second[step] == pytest.approx(first[step], rel=1e-5, abs=1e-7), step
    assert_same_adapter(adapter(straight), adapter(resumed))
