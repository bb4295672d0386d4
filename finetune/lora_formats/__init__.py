"""LoRA file formats: reading and writing every layout the kit knows (`files.py`) and the rules by which each loader applies a file (`loaders.py`)."""
