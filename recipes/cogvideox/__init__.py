"""CogVideoX: text-to-video (1.0 and 1.5, `family.py`), image-to-video (`i2v.py`), the tiny model `preset=tiny` builds (`tiny.py`) and how other tools name its modules (`keys.py`)."""
