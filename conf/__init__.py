"""The kit's Hydra configs (`train.yaml` and its groups), installed as package data so that the `cogft` command finds
them through the installed package (`importlib.resources.files("conf")`) wherever it runs. No code."""
