"""`cogft train [KEY=VALUE ...]`: what `python train.py` does in a checkout, from the installed package (its configs are
the `conf` package's data), in any directory: `cogft train recipe=cogvideox_lora preset=tiny`."""

from __future__ import annotations

import sys


def train(overrides: list[str]) -> None:
    import hydra
    from omegaconf import DictConfig

    from finetune.console import main

    @hydra.main(config_path="pkg://conf", config_name="train", version_base="1.3")
    def job(cfg: DictConfig) -> None:
        from finetune.run import train_command

        train_command(cfg)

    sys.argv = ["cogft-train", *overrides]  # Hydra reads its overrides (and --cfg, --help, -m) from the command line
    main(job, overrides)
