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


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks into node ids
def pytest_collection_modifyitems(config, items):
    schedule(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def schedule(items: list) -> None:
    """Order and group the tests for xdist (`--dist loadgroup --no-loadscope-reorder` in pyproject.toml), the results
    unchanged. The tests that share a module-scoped fixture (a reference run, a trained export) go to one worker as
    one group, so the fixture is built once instead of once per worker. The work that takes longest starts first
    (the groups and the `slow` subprocess runs that hold them, then the other slow runs, then the other groups, then
    the rest, each in file order), so that both workers finish together instead of one waiting for a long run that
    started last."""
    parent: dict[str, str] = {}  # the fixtures of one file that some test uses together share one group

    def root(key: str) -> str:
        while parent.setdefault(key, key) != key:
            key = parent[key]
        return key

    shared_of = {}
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        shared = [f"{item.path.stem}.{name}" for name, defs in (info.name2fixturedefs.items() if info else ())
                  if defs and defs[-1].scope in ("module", "package", "class")]
        for key in shared[1:]:
            parent[root(key)] = root(shared[0])
        shared_of[id(item)] = shared
    groups: dict[str, list] = {}
    for item in items:
        if shared_of[id(item)]:
            group = root(shared_of[id(item)][0])
            item.add_marker(pytest.mark.xdist_group(group))
            groups.setdefault(group, []).append(item)
    group_of = {id(item): group for group, members in groups.items() for item in members}
    slow_groups = {g for g, members in groups.items() if any("slow" in m.keywords for m in members)}

    def rank(item) -> int:
        group = group_of.get(id(item))
        if group in slow_groups:
            return 0
        if "slow" in item.keywords:
            return 1
        return 2 if group else 3

    items.sort(key=rank)  # stable: file order within each rank


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
    """The kit's cache (tiny models, demo data, encodings) for this session. Under xdist its workers share one (in the
    folder above each worker's own): what one builds the other reads instead of building it again (every entry is
    written atomically, as when ranks share a cache), and the tiny CogVideoX most tests use is built first by one
    worker while the other waits for it."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        path = tmp_path_factory.mktemp("cogft-cache")
        os.environ["COGFT_CACHE"] = str(path)
        return path
    from filelock import FileLock

    from finetune.hub import resolve_pretrained
    from recipes.cogvideox.tiny import save_tiny_cogvideox

    path = tmp_path_factory.getbasetemp().parent / "cogft-cache"
    path.mkdir(exist_ok=True)
    os.environ["COGFT_CACHE"] = str(path)
    with FileLock(f"{path}.lock"):
        resolve_pretrained("tiny", family="cogvideox", build_tiny=save_tiny_cogvideox)
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
