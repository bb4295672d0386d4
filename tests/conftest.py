"""Shared fixtures: tests run offline on CPU with tiny random models built locally."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Never touch the network or a real account; keep tiny models in a per-session cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.pop("WANDB_API_KEY", None)
REPO = Path(__file__).resolve().parents[1]


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


@pytest.fixture(scope="session", autouse=True)
def cache_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cogft-cache")
    os.environ["COGFT_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def tiny_cogvideox(cache_dir) -> str:
    from finetune.hub import resolve_pretrained
    from recipes.cogvideox_tiny import save_tiny_cogvideox

    return resolve_pretrained("tiny", family="cogvideox", build_tiny=save_tiny_cogvideox)


@pytest.fixture(scope="session")
def tiny_cogvlm(cache_dir) -> str:
    from finetune.hub import resolve_pretrained
    from recipes.cogvlm import save_tiny_cogvlm

    return resolve_pretrained("tiny", family="cogvlm", build_tiny=save_tiny_cogvlm, marker="config.json")


def run_steps(module, batch: dict, steps: int = 4) -> list[float]:
    """`steps` optimizer steps of a FinetuneModule on one fixed batch (the golden-loss loop)."""
    optimizer = module.optimizer_factory([p for p in module.parameters() if p.requires_grad])
    torch.manual_seed(1234)
    losses = []
    for _ in range(steps):
        loss = module.family.training_loss(module.encode(batch))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def compose(overrides: list[str]):
    """The real config as `train.py` composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)
