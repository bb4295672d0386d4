"""Tiny CogVLM for tests and CPU smoke runs: a LLaMA-style character tokenizer and a few-kilobyte model.

`save_tiny_cogvlm` writes a directory laid out like THUDM/cogvlm-base-490-hf (config.json, sharded
`model-0000x-of-0000y.safetensors` + `model.safetensors.index.json`), plus the tokenizer, which the real
repository does not ship (it uses lmsys/vicuna-7b-v1.5's).
"""

from __future__ import annotations

import os
import string

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)
from transformers import PreTrainedTokenizerFast

from .configuration_cogvlm import CogVLMConfig
from .modeling_cogvlm import CogVLMForCausalLM

# LLaMA / Vicuna ids, which CogVLM's config relies on: <unk> 0 (also the pad and image placeholder), <s> 1, </s> 2.
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
SPACE = "\u2581"  # SentencePiece's word marker


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with LLaMA conventions: a word marker replaces spaces and starts the text, BOS is
    prepended by `encode`, pad = unk = 0. Every ASCII letter, digit and punctuation mark, and newline, is a token,
    so captcha labels never hit <unk> and decode back exactly."""
    characters = [SPACE, *string.ascii_letters, *string.digits, *string.punctuation, "\n"]
    vocab = {token: index for index, token in enumerate([*SPECIAL_TOKENS, *characters])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first")
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS])
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def tiny_cogvlm_config(cogvlm2: bool = False, image_size: int | None = None, **overrides) -> CogVLMConfig:
    """A few-kilobyte CogVLM: decoder 64 wide, 2 layers, 4 heads (head_dim 16); ViT 32 wide, 2 layers, 2 heads.

    CogVLM1 layout: 28 px images, 14 px patches -> 2x2 patches -> 4 + 2 image tokens.
    cogvlm2=True switches on CogVLM2's differences: 2 KV heads (GQA), vision-expert QKV bias, rope base 500000 and
    the 2x2 downsample conv (56 px -> 4x4 patches -> 2x2 -> 4 + 2 image tokens).
    image_size: another image side (a multiple of 14; num_positions follows). overrides: any `CogVLMConfig` field
    (e.g. initializer_range, hidden_size); a `vision_config` dict is merged into the tiny ViT's settings.
    """
    image_size = image_size or (56 if cogvlm2 else 28)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_heads=2, image_size=image_size,
                  patch_size=14)
    vision.update(overrides.pop("vision_config", None) or {})
    vision["num_positions"] = (vision["image_size"] // vision["patch_size"]) ** 2 + 1
    settings = dict(
        vocab_size=len(SPECIAL_TOKENS) + 1 + len(string.ascii_letters + string.digits + string.punctuation) + 1,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        template_version="base",
        vision_config=vision,
    )
    if cogvlm2:
        settings.update(num_multi_query_heads=2)
    settings.update(overrides)
    return CogVLMConfig(**settings)


def build_tiny_cogvlm(seed: int = 0, cogvlm2: bool = False, **overrides) -> CogVLMForCausalLM:
    torch.manual_seed(seed)
    return CogVLMForCausalLM(tiny_cogvlm_config(cogvlm2=cogvlm2, **overrides)).eval()


def save_tiny_cogvlm(directory: str | os.PathLike, seed: int = 0, cogvlm2: bool = False, **overrides) -> str:
    """Write a tiny random CogVLM (at least two safetensors shards + index) and its tokenizer into `directory`;
    `overrides` as `tiny_cogvlm_config` (the family's `model.tiny` settings)."""
    model = build_tiny_cogvlm(seed=seed, cogvlm2=cogvlm2, **overrides)
    total_bytes = sum(tensor.numel() * tensor.element_size() for tensor in model.state_dict().values())
    # A shard limit of a third of the model forces several shards, so loading goes through the index file.
    model.save_pretrained(directory, max_shard_size=total_bytes // 3)
    build_tiny_tokenizer().save_pretrained(directory)
    return str(directory)
