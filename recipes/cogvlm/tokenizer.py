"""The CogVLM / CogVLM2 tokenizer as the checkpoints ship it (or do not): shared by the family (`family.py`) and the
captioner (`caption.py`)."""

from __future__ import annotations

import os
from pathlib import Path

from .configuration_cogvlm import CogVLMConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def load_tokenizer(model_dir: str | os.PathLike, tokenizer_path: str | None = "lmsys/vicuna-7b-v1.5"):
    """The tokenizer in the model folder when it has one (the tiny model, merged exports, THUDM/cogvlm2-*), else
    `tokenizer_path`: the THUDM/cogvlm-*-hf repositories ship none and use lmsys/vicuna-7b-v1.5's. Without a pad
    token, the checkpoint's `pad_token_id` pads (CogVLM: <unk> 0; CogVLM2: 128002, as its demos pass)."""
    from transformers import AutoTokenizer

    local = any((Path(model_dir) / f).exists() for f in TOKENIZER_FILES)
    config = CogVLMConfig.from_pretrained(model_dir)
    try:
        if local:  # the config is passed so AutoTokenizer does not re-read config.json as an unknown model type
            tokenizer = AutoTokenizer.from_pretrained(str(model_dir), config=config)
        elif tokenizer_path is None:
            raise FileNotFoundError(f"{model_dir} has no tokenizer")
        else:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    except Exception as err:
        raise FileNotFoundError(
            f"no tokenizer in {model_dir} and tokenizer_path={tokenizer_path!r} could not be loaded "
            f"({type(err).__name__}). Download it (CogVLM: `hf download lmsys/vicuna-7b-v1.5 --local-dir DIR`) and "
            f"pass model.tokenizer_path=DIR.") from None
    if tokenizer.pad_token_id is None:  # CogVLM pads (and fills image slots) with <unk> = 0, CogVLM2 with 128002
        if config.pad_token_id is None:
            raise ValueError(f"neither the tokenizer nor {model_dir}/config.json names a pad token: set pad_token_id.")
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config.pad_token_id)
    return tokenizer
