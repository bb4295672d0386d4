"""CogView: CogView4 (`cogview4.py`) and CogView3-Plus (`cogview3plus.py`) text-to-image, each with the tiny model `preset=tiny` builds."""
