"""Tiny text encoders with tokenizers built locally (no hub), saved in the real checkpoints' layout."""

from __future__ import annotations

import string

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


def tiny_t5(d_model: int = 32, seed: int = 0) -> dict:
    """`text_encoder` (T5EncoderModel) and `tokenizer` as in THUDM/CogVideoX-2b, tiny."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = _t5_tokenizer()
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                      num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False)
    return {"text_encoder": T5EncoderModel(config).eval(), "tokenizer": tokenizer}


# -- GLM-4 (CogView4's text encoder) -----------------------------------------------------------------
# A byte-level BPE (as GLM-4's tokenizer) trained here on a fixed bilingual corpus: every UTF-8 string
# tokenizes (unseen characters fall back to bytes), and the demo captions' Chinese characters and English
# words become single tokens. CJK characters are split one by one before the byte-level step, so a longer
# Chinese caption gives more tokens. The trainer is deterministic, so golden losses are reproducible.
GLM_SPECIAL_TOKENS = ("<|endoftext|>", "[gMASK]", "<sop>")
GLM_CORPUS = [
    " ".join(DEMO_WORDS) + " triangle white shapes",
    "红色 绿色 蓝色 黄色 白色 黑色 紫色 橙色 圆形 正方形 三角形 背景 上的 一个 一只 狗 猫 照片 在 和 小 大",
    "a red circle on a white background", "白色背景上的一个红色圆形",
]
CJK = r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff00-\uffef]"


def glm_tokenizer():
    """`PreTrainedTokenizerFast` with GLM-4's conventions: `[gMASK]<sop>` prefix (added by
    `add_special_tokens=True`, as the pipeline calls it), pad = eos = `<|endoftext|>`, padding on the left."""
    from tokenizers import Regex, decoders, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CJK), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=list(GLM_SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(GLM_CORPUS * 2, trainer)
    ids = {t: backend.token_to_id(t) for t in GLM_SPECIAL_TOKENS}
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] <sop> $A", special_tokens=[("[gMASK]", ids["[gMASK]"]), ("<sop>", ids["<sop>"])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   padding_side="left", model_max_length=1024)


def tiny_glm(hidden_size: int = 32, seed: int = 0) -> dict:
    """`text_encoder` (transformers `GlmModel`) and `tokenizer` as in THUDM/CogView4-6B, tiny."""
    from transformers import GlmConfig, GlmModel

    tokenizer = glm_tokenizer()
    torch.manual_seed(seed)
    config = GlmConfig(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=hidden_size // 4,
                       max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
                       eos_token_id=tokenizer.eos_token_id, attention_dropout=0.0)
    return {"text_encoder": GlmModel(config).eval(), "tokenizer": tokenizer}
