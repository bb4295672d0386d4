"""Train a recipe: `python train.py recipe=cogvideox_lora [preset=tiny] [key=value ...]`.

Composes the config (conf/), builds the objects it names and connects them (finetune/run.py).
"""

import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from finetune.run import train

    train(cfg)


if __name__ == "__main__":
    main()
