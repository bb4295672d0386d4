"""Tiny text encoders with tokenizers built locally (no hub), saved in the real checkpoints' layout."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

# Words of the demo captions get their own token, everything else falls back to characters, so any
# ASCII caption tokenizes without <unk> and the tokenizer stays tiny.
DEMO_WORDS = ("a an the red green blue yellow white purple orange circle square triangle moves moving "
              "left right up down to from on black background slowly quickly small big dog cat photo "
              "of in with and").split()


def _t5_tokenizer():
    from transformers import T5Tokenizer

    pieces = ["<pad>", "</s>", "<unk>", "▁"] + ["▁" + w for w in DEMO_WORDS]
    pieces += list(string.ascii_letters + string.digits + string.punctuation)
    vocab = [(p, -float(i) / 10.0) for i, p in enumerate(pieces)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5Tokenizer(tokenizer_object=backend, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                       extra_ids=0)


def save_tiny_t5(root: Path, d_model: int = 32, seed: int = 0) -> None:
    """`text_encoder/` (T5EncoderModel) and `tokenizer/` as in THUDM/CogVideoX-2b, tiny."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    T5EncoderModel(config).eval().save_pretrained(root / "text_encoder")
    tokenizer.save_pretrained(root / "tokenizer")
