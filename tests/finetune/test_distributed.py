"""Several processes on CPU with gloo, through the real config and `train`: DDP (spawned) and FSDP2 (Lightning's
ModelParallelStrategy, launched by `train.py`) train the tiny CogVideoX LoRA to the adapter one process trains on the
same global batch; a two-process run resumed from a checkpoint continues exactly; validation requests are split
across the ranks and gathered to rank zero; every rank draws from its own random stream."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import REPO, TEST_DIRS, compose
from safetensors.torch import load_file

from finetune.rng import rank_seed
from finetune.run import train
from recipes.cogvideox.family import CogVideoX

PROMPTS = '["a red circle moves left","a blue square moves up","a green circle moves right"]'


class KeyedNoiseCogVideoX(CogVideoX):
    """The tiny CogVideoX with each sample's latent draw, noise and timestep taken from a generator seeded by (its key,
    the step) instead of the rank's stream: one process on a batch of 2 and two processes on 1 each then draw the same
    numbers for the same samples, so their updates must agree (the per-rank streams are tested by the resume test).
    Its samples are captioned with the rank that made them."""

    step = 0  # set by `StepToFamily` before each batch

    def training_loss(self, encoded: dict, noise=None, timesteps=None) -> torch.Tensor:
        self._generators = [torch.Generator().manual_seed(zlib.crc32(f"{key}|{self.step}".encode()))
                            for key in encoded["key"]]
        mean = _stacked(encoded["latent_mean"])
        shape = (mean.shape[2], mean.shape[1], *mean.shape[3:])  # [F, C, H, W], as `sample_latents` lays it out
        noise = torch.stack([torch.randn(shape, generator=g) for g in self._generators])
        timesteps = torch.cat([torch.randint(0, 1000, (1,), generator=g) for g in self._generators])
        return super().training_loss(encoded, noise=noise, timesteps=timesteps)

    def sample_latents(self, encoded: dict) -> torch.Tensor:
        mean, logvar = _stacked(encoded["latent_mean"]).float(), _stacked(encoded["latent_logvar"]).float()
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in self._generators])
        latents = (mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps) * self.vae.config.scaling_factor
        return latents.permute(0, 2, 1, 3, 4)

    def generate(self, requests, seed, **kwargs):
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        samples = super().generate(requests, seed, **kwargs)
        for sample in samples:
            sample.caption = f"{sample.caption} [rank {rank}]"
        return samples


class StepToFamily(L.Callback):
    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        module.family.step = trainer.global_step


def _stacked(value):
    return torch.stack(list(value)) if isinstance(value, (list, tuple)) else value


def overrides(run_dir: Path, *extra: str) -> list[str]:
    # 8 samples, 4 steps of 2: checkpoints at step 2 are mid-epoch (the data order across an epoch boundary is the data
    # module's business, tested with it)
    return ["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}", "data.demo_count=8",
            "trainer.max_steps=4", "trainer.log_every_n_steps=1", "callbacks.samples.every_n_steps=0",
            "callbacks.samples.at_end=false", "callbacks.checkpoint.every_n_train_steps=100", *extra]


KEYED = ["model._target_=test_distributed.KeyedNoiseCogVideoX", "trainer.gradient_clip_val=0.05",
         "+callbacks.keyed_step._target_=test_distributed.StepToFamily"]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "export" / "pytorch_lora_weights.safetensors")


def losses(run_dir: Path) -> dict[int, float]:
    with (run_dir / "csv" / "metrics.csv").open() as f:
        return {int(row["step"]): float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")}


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert a[key].numel() > 0
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=2e-6, msg=key)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> Path:
    """The reference: one process, batches of 2 (the two-process runs' global batch)."""
    run_dir = tmp_path_factory.mktemp("one_process")
    train(compose(overrides(run_dir, *KEYED, "data.batch_size=2")))
    return run_dir


def test_rank_streams_are_distinct_and_reproducible():
    assert rank_seed(42, 0) == 42  # rank zero keeps the run's seed: one-process runs are unchanged
    seeds = [rank_seed(42, r) for r in range(8)]
    assert len(set(seeds)) == 8 and seeds == [rank_seed(42, r) for r in range(8)]
    assert rank_seed(43, 1) not in seeds and all(0 <= s < 2**63 for s in seeds)


def test_a_checkpoint_gives_each_rank_its_stream_back():
    """Same process count: rank r gets stream r back. An earlier kit's one-process entry: rank 0 continues it. Another
    process count: fresh streams derived from (seed, step, rank), with a warning."""
    from finetune import rng

    states = []
    for rank in range(2):
        rng.seed_rank(7, rank)
        states.append(rng.capture())
    entry = {"per_rank": states}
    for rank in (1, 0):
        torch.manual_seed(123)
        rng.restore_from_checkpoint(entry, seed=7, rank=rank, world_size=2, step=5)
        torch.testing.assert_close(torch.get_rng_state(), states[rank]["torch"])
    rng.restore_from_checkpoint({"torch": states[1]["torch"]}, seed=7, rank=0, world_size=1, step=5)
    torch.testing.assert_close(torch.get_rng_state(), states[1]["torch"])
    rng.seed_rank(rng.rank_seed(7, 5), 0)
    fresh = torch.get_rng_state()
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="holds the random streams of 2 processes and this run has 4"):
        rng.restore_from_checkpoint(entry, seed=7, rank=0, world_size=4, step=5)
    torch.testing.assert_close(torch.get_rng_state(), fresh)


def test_validation_requests_are_split_only_with_whole_weights():
    """Contiguous runs, at most one apart, request i keeping seed + i; every rank makes every request when the
    weights are sharded (its forwards are collectives)."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import DDPStrategy

    from finetune.callbacks import ValidationSamples
    from finetune.strategies import FSDP2Strategy

    callback = ValidationSamples(prompts=["a", "b", "c", "d", "e"])
    shares = [callback.share(SimpleNamespace(world_size=3, global_rank=r, strategy=DDPStrategy())) for r in range(3)]
    assert [(start, [q.prompt for q in mine]) for start, mine in shares] == [(0, ["a", "b"]), (2, ["c", "d"]),
                                                                               (4, ["e"])]
    sharded = SimpleNamespace(world_size=2, global_rank=1, strategy=FSDP2Strategy())
    assert callback.share(sharded)[0] == 0 and len(callback.share(sharded)[1]) == 5


def test_ddp_matches_one_process_and_splits_validation(one_process, tmp_path):
    """Two spawned processes with a batch of 1 each train the adapter one process trains with a batch of 2; each rank
    encodes its half of the samples (and of the validation prompts) into the (empty) cache; the 3 validation prompts are split 2 + 1 across the ranks
    and rank zero writes all of them, in order."""
    train(compose(overrides(tmp_path, *KEYED, "strategy=ddp_spawn", "trainer.devices=2", "data.batch_size=1",
                            "callbacks.samples.at_end=true", f"callbacks.samples.prompts={PROMPTS}",
                            f"module.cache_dir={tmp_path}/encoded")))
    # every sample once, by one of the ranks, and the 3 validation prompts' embeddings (docs/memory.md#lazy-encoders)
    assert len(list((tmp_path / "encoded").rglob("*.safetensors"))) == 8 + 3
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    reference = adapter(one_process)
    assert any(v.abs().max() > 0 for k, v in reference.items() if "lora_B" in k)  # it trained
    assert_same_adapter(reference, adapter(tmp_path))
    captions = json.loads((tmp_path / "samples" / "step_000004" / "prompts.json").read_text())
    assert [c.split(" [rank")[0] for c in captions] == json.loads(PROMPTS)
    assert [c.rsplit("[rank ", 1)[1].rstrip("]") for c in captions] == ["0", "0", "1"]
    assert sorted(p.name for p in (tmp_path / "samples" / "step_000004").glob("*.mp4")) == ["00.mp4", "01.mp4",
                                                                                            "02.mp4"]


def run_train_py(*args: str) -> None:
    """`python train.py ...` as a user runs it (Lightning starts the other processes itself)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*TEST_DIRS, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_fsdp2_matches_one_process_and_resumes(one_process, tmp_path):
    """FSDP2 (`fully_shard` on each CogVideoXBlock, then the transformer) over two processes that `train.py`
    launches: the exported adapter is complete (whole tensors, gathered from the shards) and equals one process's;
    the LoRA-only checkpoint of step 2 resumes to the same adapter."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fsdp2 = [*KEYED, "strategy=fsdp2", "trainer.devices=2", "data.batch_size=1",
             "callbacks.checkpoint.every_n_train_steps=2", "callbacks.checkpoint.save_top_k=-1"]
    run_train_py(*overrides(straight, *fsdp2))
    assert_same_adapter(adapter(one_process), adapter(straight))
    middle = next((straight / "checkpoints").glob("*step=2.ckpt"))
    checkpoint = torch.load(middle, map_location="cpu", weights_only=True)
    assert checkpoint["state_dict"] and all("lora_" in k for k in checkpoint["state_dict"])
    assert len(checkpoint["rng_state"]["per_rank"]) == 2
    run_train_py(*overrides(resumed, *fsdp2, f"ckpt_path='{middle}'"))
    assert_same_adapter(adapter(one_process), adapter(resumed))


@pytest.mark.slow
def test_readme_torchrun_command(tmp_path):
    """The torchrun launch of docs/scaling.md, as written (in a temporary run_dir, CSV logging, fewer steps)."""
    import re
    import shlex

    readme = (REPO / "docs" / "scaling.md").read_text(encoding="utf-8")
    command = re.search(r"<!-- torchrun -->\n```\w*\n(.*?)```", readme, re.S).group(1).strip()
    assert command.startswith("torchrun --standalone --nproc_per_node=2 train.py") and "run_dir=" in command
    args = [a for a in shlex.split(command) if not a.startswith("run_dir=")]
    args[0:1] = [sys.executable, "-m", "torch.distributed.run"]
    args += [f"run_dir={tmp_path}", "logger=csv", "trainer.max_steps=4", "data.demo_count=4",
             "callbacks.samples.every_n_steps=0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and list((tmp_path / "samples").glob("step_*/00.mp4"))


def test_an_adapter_with_partitioned_tensors_is_refused(tiny_cogvideox, tmp_path):
    """Under ZeRO-3 a parameter outside `GatheredParameters` is an empty placeholder: the export stops, naming it,
    instead of writing an adapter that loads and does nothing."""
    from test_cogvideox_objective import tiny_family

    from finetune.adapters import LoRA
    from finetune.module import FinetuneModule

    module = FinetuneModule(tiny_family(), LoRA(rank=4, alpha=4), optimizer=lambda p: torch.optim.AdamW(p))
    name, param = next((n, p) for n, p in module.named_parameters() if "lora_B" in n)
    param.data = torch.empty(0)
    with pytest.raises(RuntimeError, match=r"lora_B.*empty \(shape \(0,\)\).*gathered first.*nothing was written"):
        module.family.export(tmp_path, module.adapter)
    assert not list(tmp_path.iterdir())
