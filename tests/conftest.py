"""Shared fixtures: tests run offline on CPU with tiny random models built locally."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# Never touch the network or a real account; keep tiny models in a per-session cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
# Processes the tests start (ddp_spawn ranks, train.py, torchrun) take one thread each: two ranks on two cores, no
# threads spin-waiting for a core.
os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]
# The tests mirror the packages (tests/finetune/, tests/recipes/cogvideox/, ...); helpers and test callbacks are
# imported by their module's name (`from test_cogvideox_objective import tiny_family`, `_target_=test_run_safety.X`),
# so every test folder is importable, here and in the processes the tests start (TEST_DIRS in their PYTHONPATH).
TEST_DIRS = sorted({str(path.parent) for path in Path(__file__).parent.rglob("test_*.py")})
sys.path[:0] = [d for d in TEST_DIRS if d not in sys.path]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: end-to-end subprocess runs")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_wandb_run_left_open():
    """A test that builds a W&B logger without training (`finetune.run.build` alone) leaves its run open, and every
    later `WandbLogger` in this process would log into it: each test ends with none open (`train` closes its own)."""
    yield
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cogft-cache")
    os.environ["COGFT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_cogvideox(cache_dir) -> str:
    from finetune.hub import resolve_pretrained
    from recipes.cogvideox.tiny import save_tiny_cogvideox

    return resolve_pretrained("tiny", family="cogvideox", build_tiny=save_tiny_cogvideox)


@pytest.fixture(scope="session")
def tiny_cogvlm(cache_dir) -> str:
    from finetune.hub import resolve_pretrained
    from recipes.cogvlm import save_tiny_cogvlm

    return resolve_pretrained("tiny", family="cogvlm", build_tiny=save_tiny_cogvlm, marker="config.json")


def perturb_trainable(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> None:
    """Move every trainable weight by seeded noise, as training would (a fresh LoRA's B is zero, so an export
    test of an untrained adapter could not tell a lost update from a kept one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in (p for p in module.parameters() if p.requires_grad):
            param += scale * torch.randn(param.shape, generator=generator).to(param)


def compose(overrides: list[str]):
    """The real config as `train.py` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)
