"""One epoch from the encoded cache versus decoding and encoding every step, and the cache's size per sample.

    OMP_NUM_THREADS=1 python bench/encode_cache.py                    # tiny CogVideoX demo: 8 clips, 3 rounds
    OMP_NUM_THREADS=1 python bench/encode_cache.py --samples 16 --rounds 5

Both paths are the real recipe (`recipe=cogvideox_lora preset=tiny`, batch 1, fp32, CPU) through `finetune.run.train`
for one epoch: `module.cache=off` (each step decodes the clip, resizes it, runs the VAE and T5) and `module.cache=on`
with a warm cache (the precompute pass finds every sample; each step reads its encodings). The runs alternate, in
one process; a callback times the epoch from its start to its end, so model loading and the precompute pass are not
in it (it is timed on its own: cold in the first cached run, warm in the others). Validation samples, export and
checkpoints are off.

The size per sample at a real shape is computed from shapes (VAE: 4x in time keeping the first frame, 8x in space,
16 channels; mean and logvar; T5-XXL 4096 wide) and checked against the files of the tiny run, whose payload the same
formula must give exactly (a safetensors file is its tensors' bytes plus a small JSON header).
"""

from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def entry_bytes(frames: int, height: int, width: int, text_tokens: int, text_width: int = 4096,
                latent_channels: int = 16, dtype: str = "bf16") -> dict[str, int]:
    """Bytes of one CogVideoX cache entry's tensors: posterior mean + logvar [C, (F-1)/4+1, H/8, W/8] and the T5
    embeddings [tokens, width]."""
    latent = latent_channels * ((frames - 1) // 4 + 1) * (height // 8) * (width // 8)
    size = DTYPE_BYTES[dtype]
    moments, text = 2 * latent * size, text_tokens * text_width * size
    return {"latent_moments": moments, "text_embeddings": text, "total": moments + text}


def payload_bytes(path: Path) -> int:
    """A safetensors file's tensor bytes: its size less the 8-byte header length and the header."""
    with path.open("rb") as f:
        (header,) = struct.unpack("<Q", f.read(8))
    return path.stat().st_size - 8 - header


class EpochTimer(L.Callback):
    """Seconds of the (single) training epoch, and from `on_fit_start` (before the module's precompute pass) to
    `on_train_start`."""

    def __init__(self):
        self.epoch_s = self.before_training_s = 0.0

    def on_fit_start(self, trainer, module) -> None:
        self._fit = time.perf_counter()

    def on_train_start(self, trainer, module) -> None:
        self.before_training_s = time.perf_counter() - self._fit

    def on_train_epoch_start(self, trainer, module) -> None:
        self._epoch = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.epoch_s = time.perf_counter() - self._epoch


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def epoch(work: Path, name: str, samples: int, cache: str) -> EpochTimer:
    from finetune.run import train

    cfg = compose(["recipe=cogvideox_lora", "preset=tiny", "logger=none", f"run_dir={work / name}",
                   f"data.demo_count={samples}", "data.batch_size=1", f"trainer.max_steps={samples}",
                   "trainer.max_epochs=1", "callbacks.samples=null", "callbacks.export=null",
                   "callbacks.checkpoint=null", f"module.cache={cache}", f"module.cache_dir={work / 'encoded'}",
                   "+callbacks.epoch_timer._target_=encode_cache.EpochTimer"])
    module = train(cfg)
    # by name: run as a script this file is `__main__`, while Hydra builds `encode_cache.EpochTimer`
    (timer,) = [c for c in module.trainer.callbacks if type(c).__name__ == "EpochTimer"]
    return timer


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=8, help="clips in the epoch (the generated demo set)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating off/on epochs of each")
    parser.add_argument("--work", default=None, help="folder for runs and the cache (default: a temporary one)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # `encode_cache.EpochTimer` for Hydra

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        off, on, before_training = [], [], []
        for r in range(args.rounds):
            off.append(epoch(work, f"off{r}", args.samples, "off").epoch_s)
            timer = epoch(work, f"on{r}", args.samples, "on")  # the first fills the cache before its epoch
            on.append(timer.epoch_s)
            before_training.append(timer.before_training_s)
        files = sorted((work / "encoded").rglob("*.safetensors"))
        tiny_payload = {payload_bytes(f) for f in files}
    # the tiny model: 9 x 32 x 32 clips, 16 T5 tokens of its 32-wide stand-in encoder, fp32
    tiny_formula = entry_bytes(9, 32, 32, text_tokens=16, text_width=32, dtype="fp32")["total"]
    result = {
        "samples": args.samples, "rounds": args.rounds,
        "epoch_s_decode_and_encode": statistics.median(off), "epoch_s_from_cache": statistics.median(on),
        "speedup": statistics.median(off) / statistics.median(on),
        "epochs_s": {"off": off, "on": on},
        "precompute_s_cold": before_training[0], "precompute_s_warm": before_training[1:],
        "entries": len(files), "tiny_entry_payload_bytes": sorted(tiny_payload), "tiny_formula_bytes": tiny_formula,
        "real_49x480x720_bf16": entry_bytes(49, 480, 720, text_tokens=226),
        "real_49x480x720_fp32": entry_bytes(49, 480, 720, text_tokens=226, dtype="fp32"),
        "real_81x768x1360_bf16": entry_bytes(81, 768, 1360, text_tokens=226),
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
