"""One random stream per rank: derived from the run's seed and the rank, saved per rank in checkpoints and restored
per rank on resume.

The families draw their noise, timesteps and posterior samples from the global torch RNG (`torch.randn_like`,
`torch.randint`). Lightning seeds every process alike (`seed_everything`, then `reset_seed()` when the processes
connect), so without this every rank would draw the same noise and timesteps for its different samples, and a
checkpoint written by rank zero would hold rank zero's state only. Here:

- with several processes, rank r seeds torch, CUDA and Python's `random` with `rank_seed(seed, r)` once the
  processes are connected (`FinetuneModule.setup`); rank 0 keeps the run's seed itself;
- a single process keeps the stream it has (the seed's, continued past the model's initialisation), so one-device
  runs and their golden losses are unchanged;
- a checkpoint holds every rank's state (gathered to the writer), and a resumed run with the same number of
  processes gives each rank its own state back: the draws continue exactly where they stopped.
"""

from __future__ import annotations

import hashlib
import random
import warnings

import torch


def rank_seed(seed: int, rank: int) -> int:
    """Rank 0: `seed`; rank r > 0: 63 bits of SHA-256 over (seed, r), so neighbouring seeds or ranks give unrelated
    streams (no `seed + rank` overlap between runs seeded 1 and 2)."""
    if rank == 0:
        return int(seed)
    digest = hashlib.sha256(f"cog-finetune rank stream {int(seed)} {int(rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_rank(seed: int, rank: int) -> None:
    """Seed this process's torch (CPU and every CUDA device) and Python `random` streams for `rank`."""
    derived = rank_seed(seed, rank)
    torch.manual_seed(derived)
    random.seed(derived)


def capture() -> dict:
    """This process's random state: torch CPU, the current CUDA device's (one device per process), Python's."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "python" in state:
        random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def gather(strategy) -> list[dict]:
    """Every rank's `capture()`, in rank order, on every rank (a collective: every rank calls it, as every rank
    builds the checkpoint dict). One process: `[capture()]`."""
    mine = capture()
    dist = torch.distributed
    if strategy is None or strategy.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def checkpoint_entry(strategy) -> dict:
    """What `on_save_checkpoint` stores under `rng_state`."""
    return {"per_rank": gather(strategy)}


def restore_from_checkpoint(entry: dict | None, seed: int | None, rank: int, world_size: int, step: int) -> None:
    """Give this rank its saved stream. A checkpoint written by a different number of processes cannot continue
    exactly: each rank then starts a fresh stream derived from (seed, rank, step), and says so."""
    if not entry:
        return
    per_rank = entry.get("per_rank")
    if per_rank is None and "torch" in entry:  # a checkpoint of an earlier kit version: one process's state
        per_rank = [{"torch": entry["torch"]}]
    if per_rank is not None and len(per_rank) == world_size:
        restore(per_rank[rank])
        return
    if rank == 0:
        warnings.warn(f"the checkpoint holds the random streams of {len(per_rank or [])} processes and this run has "
                      f"{world_size}: the noise and timestep draws start fresh streams (derived from seed {seed} and "
                      f"step {step}) instead of continuing exactly. Resume with the same trainer.devices x "
                      f"trainer.num_nodes for an exact continuation.", stacklevel=2)
    seed_rank(rank_seed(int(seed or 0), step), rank)
