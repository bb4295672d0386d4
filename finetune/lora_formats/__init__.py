"""LoRA file formats: reading every layout the kit knows (`files.py`), writing them (`writing.py`), and the rules by
which each loader applies a file (`loaders.py`)."""
