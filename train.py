"""Train a recipe: `python train.py recipe=cogvideox_lora [preset=tiny] [key=value ...]`.

Composes the config (conf/), builds the objects it names and connects them (finetune/run.py). A mistake (a setting,
the data, a path) is printed as one line, `error: ...`, with exit status 1; `debug=true` or HYDRA_FULL_ERROR=1 shows
the traceback (finetune/console.py).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from finetune.run import train_command

    train_command(cfg)


if __name__ == "__main__":
    from finetune.console import main as run

    run(main)
