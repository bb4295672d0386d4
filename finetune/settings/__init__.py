"""The config checker: every setting of a composed config against its target's signature (`check.py`), with the
vocabulary of types and ranges it checks them with (`types.py`)."""
