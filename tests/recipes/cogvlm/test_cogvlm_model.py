"""Native CogVLM: checkpoint key names/shapes, expert routing, positions, KV-cache generation, save/load, prompts."""

import json
import string
import warnings

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoTokenizer

from recipes.cogvlm import (
    IGNORE_INDEX,
    CogVLMConfig,
    CogVLMForCausalLM,
    build_conversation_input_ids,
    build_position_ids,
    build_tiny_cogvlm,
    build_tiny_tokenizer,
    collate_left_padded,
    history_to_prompt,
    preprocess_image,
    save_tiny_cogvlm,
    vision_expert_mask,
)

# config.json of THUDM/cogvlm-chat-hf (remote-code keys included: they must load as extra attributes).
COGVLM_CHAT_HF_CONFIG = {
    "architectures": ["CogVLMForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_cogvlm.CogVLMConfig",
        "AutoModelForCausalLM": "modeling_cogvlm.CogVLMForCausalLM",
    },
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 2048,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-05,
    "template_version": "chat",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.35.0",
    "use_cache": True,
    "vision_config": {
        "dropout_prob": 0.0,
        "hidden_act": "gelu",
        "hidden_size": 1792,
        "image_size": 490,
        "in_channels": 3,
        "intermediate_size": 15360,
        "layer_norm_eps": 1e-06,
        "num_heads": 16,
        "num_hidden_layers": 63,
        "num_positions": 1226,
        "patch_size": 14,
    },
    "vocab_size": 32000,
}


# With the real init std (0.02) a 64-wide random model attends almost uniformly, so position or cache bugs barely
# move its logits; a larger std makes the tiny model sensitive to them.
SHARP_INIT = 0.3


def _meta_model(config):
    with torch.device("meta"):
        return CogVLMForCausalLM(config)


def _shapes(model):
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _expected_cogvlm1_shapes():
    """Names and shapes of the cogvlm-chat-hf / cogvlm-base-490-hf safetensors (docs/cogvlm.md#architecture)."""
    expected = {
        "model.embed_tokens.weight": (32000, 4096),
        "model.norm.weight": (4096,),
        "lm_head.weight": (32000, 4096),
        "model.vision.patch_embedding.proj.weight": (1792, 3, 14, 14),
        "model.vision.patch_embedding.proj.bias": (1792,),
        "model.vision.patch_embedding.cls_embedding": (1, 1792),
        "model.vision.patch_embedding.position_embedding.weight": (1226, 1792),
        "model.vision.linear_proj.linear_proj.weight": (4096, 1792),
        "model.vision.linear_proj.norm1.weight": (4096,),
        "model.vision.linear_proj.norm1.bias": (4096,),
        "model.vision.linear_proj.dense_h_to_4h.weight": (11008, 4096),
        "model.vision.linear_proj.gate_proj.weight": (11008, 4096),
        "model.vision.linear_proj.dense_4h_to_h.weight": (4096, 11008),
        "model.vision.boi": (1, 1, 4096),
        "model.vision.eoi": (1, 1, 4096),
    }
    for i in range(32):
        layer = f"model.layers.{i}."
        expected[layer + "input_layernorm.weight"] = (4096,)
        expected[layer + "post_attention_layernorm.weight"] = (4096,)
        for expert in ("vision", "language"):
            expected[layer + f"self_attn.{expert}_expert_query_key_value.weight"] = (12288, 4096)
            expected[layer + f"self_attn.{expert}_expert_dense.weight"] = (4096, 4096)
            expected[layer + f"mlp.{expert}_mlp.gate_proj.weight"] = (11008, 4096)
            expected[layer + f"mlp.{expert}_mlp.up_proj.weight"] = (11008, 4096)
            expected[layer + f"mlp.{expert}_mlp.down_proj.weight"] = (4096, 11008)
    for j in range(63):
        layer = f"model.vision.transformer.layers.{j}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            expected[layer + f"{norm}.weight"] = (1792,)
            expected[layer + f"{norm}.bias"] = (1792,)
        expected[layer + "attention.query_key_value.weight"] = (5376, 1792)
        expected[layer + "attention.query_key_value.bias"] = (5376,)
        expected[layer + "attention.dense.weight"] = (1792, 1792)
        expected[layer + "attention.dense.bias"] = (1792,)
        expected[layer + "mlp.fc1.weight"] = (15360, 1792)
        expected[layer + "mlp.fc1.bias"] = (15360,)
        expected[layer + "mlp.fc2.weight"] = (1792, 15360)
        expected[layer + "mlp.fc2.bias"] = (1792,)
    return expected


def test_cogvlm1_checkpoint_keys_and_shapes():
    config = CogVLMConfig.from_dict(COGVLM_CHAT_HF_CONFIG)
    model = _meta_model(config)
    assert _shapes(model) == _expected_cogvlm1_shapes()
    # The rotary table is a buffer, but not a weight: nothing but parameters is saved.
    assert "model.rotary_emb.inv_freq" in dict(model.named_buffers())
    assert set(model.state_dict()) == {name for name, _ in model.named_parameters()}
    assert config.num_image_tokens == (490 // 14) ** 2 + 2 == 1227
    assert (config.rope_theta, config.num_key_value_heads, config.template_version) == (10000.0, 32, "chat")


def test_cogvlm2_differences():
    # THUDM/cogvlm2-llama3-chat-19B: Llama-3-8B decoder (GQA, 8 KV heads), 1344 px images, `num_multi_query_heads`.
    config = CogVLMConfig(
        vocab_size=128256,
        intermediate_size=14336,
        num_multi_query_heads=8,
        max_position_embeddings=8192,
        bos_token_id=128000,
        eos_token_id=128001,
        pad_token_id=128002,
        vision_config={"image_size": 1344, "num_positions": 9217},
    )
    shapes = _shapes(_meta_model(config))
    layer = "model.layers.0.self_attn."
    assert shapes[layer + "language_expert_query_key_value.weight"] == (4096 + 2 * 8 * 128, 4096) == (6144, 4096)
    assert shapes[layer + "vision_expert_query_key_value.weight"] == (6144, 4096)
    assert shapes[layer + "vision_expert_query_key_value.bias"] == (6144,)
    assert layer + "language_expert_query_key_value.bias" not in shapes
    assert shapes["model.vision.conv.weight"] == (1792, 1792, 2, 2)
    assert shapes["model.vision.conv.bias"] == (1792,)
    assert shapes["model.vision.linear_proj.linear_proj.weight"] == (4096, 1792)
    assert shapes["model.layers.0.mlp.vision_mlp.gate_proj.weight"] == (14336, 4096)
    assert config.rope_theta == 500000.0
    assert config.num_image_tokens == (1344 // 14 // 2) ** 2 + 2 == 2306


def _image_batch(tokenizer, model, answers=("ab12", "XyZ9")):
    """Two left-padded training samples: the first without an image, the second with one."""
    samples = [
        build_conversation_input_ids(tokenizer, "CAPTCHA:", answer=answers[0]),
        build_conversation_input_ids(
            tokenizer, "CAPTCHA:", images=1, image_token_count=model.config.num_image_tokens, answer=answers[1]
        ),
    ]
    size = model.config.vision_config["image_size"]
    samples[1]["images"] = torch.randn(3, size, size, generator=torch.Generator().manual_seed(1))
    return collate_left_padded(samples, tokenizer.pad_token_id)


@pytest.mark.parametrize("cogvlm2", [False, True])
def test_forward_backward_and_gradient_checkpointing(cogvlm2):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_cogvlm(cogvlm2=cogvlm2).train()
    batch = _image_batch(tokenizer, model)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    # The loss is the mean next-token cross-entropy over the answer + EOS tokens only.
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    keep = labels != IGNORE_INDEX
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(logits[keep], labels[keep]))
    out.loss.backward()
    grads = {name: param.grad for name, param in model.named_parameters()}
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads.values())
    # Vision-expert outputs of the last layer only reach logits at image positions, which carry no label.
    last = model.config.num_hidden_layers - 1
    no_signal = (f"model.layers.{last}.self_attn.vision_expert_dense", f"model.layers.{last}.mlp.vision_mlp")
    zero = sorted(name for name, grad in grads.items() if not grad.any())
    assert zero == sorted(name for name in grads if name.startswith(no_signal))

    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers 5 renames it activation_checkpointing_enable
        model.gradient_checkpointing_enable()
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    assert all(layer.gradient_checkpointing for layer in model.model.vision.transformer.layers)
    checkpointed = model(**batch)
    checkpointed.loss.backward()
    torch.testing.assert_close(checkpointed.loss, out.loss)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_expert_routing():
    # [BOS, boi, 4 patches, eoi, text...]: boi and patches use the vision expert, eoi (next token is text) does not.
    token_type_ids = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0, 0]])
    assert vision_expert_mask(token_type_ids).tolist() == [[False, True, True, True, True, True, False, False, False]]

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_cogvlm()
    sample = build_conversation_input_ids(tokenizer, "CAPTCHA:", images=1, image_token_count=6)
    inputs = {key: value[None] for key, value in sample.items()}
    inputs["images"] = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    captured = []
    model.model.layers[0].register_forward_hook(lambda module, args, output: captured.append(output))

    def layer0_output():
        captured.clear()
        with torch.no_grad():
            model(**inputs)
        return captured[0][0]

    vision_rows, other_rows = [1, 2, 3, 4, 5], [0, 6, *range(7, len(sample["input_ids"]))]
    reference = layer0_output()
    layer0 = model.model.layers[0]
    for experts, changed, unchanged in [
        ((layer0.self_attn.vision_expert_dense, layer0.mlp.vision_mlp), vision_rows, other_rows),
        ((layer0.self_attn.language_expert_dense, layer0.mlp.language_mlp), other_rows, vision_rows),
    ]:
        with torch.no_grad():
            for expert in experts:
                for param in expert.parameters():
                    param.add_(0.5)
        perturbed = layer0_output()
        assert (perturbed[changed] - reference[changed]).abs().amax(-1).gt(1e-4).all()
        torch.testing.assert_close(perturbed[unchanged], reference[unchanged], rtol=0, atol=0)
        reference = perturbed


def test_position_ids():
    # Published rule: BOS 0, boi 1, every patch 2, eoi 3, text from 4.
    token_type_ids = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    assert build_position_ids(token_type_ids).tolist() == [[0, 1, 2, 2, 2, 2, 3, 4, 5, 6]]
    # Left padding is skipped: the real tokens keep the positions they have alone; padding gets 0.
    padded = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1, 1, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1, 1, 1]])
    assert build_position_ids(padded, mask).tolist() == [[0, 0, 0, 1, 2, 2, 2, 2, 3, 4], [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]]
    # Text only: plain 0, 1, 2, ...
    assert build_position_ids(torch.zeros(1, 4, dtype=torch.long)).tolist() == [[0, 1, 2, 3]]


def _prompts(tokenizer, model):
    """A text-only prompt and a longer image prompt, so the batch needs left padding."""
    size = model.config.vision_config["image_size"]
    image = torch.randn(3, size, size, generator=torch.Generator().manual_seed(2))
    first = build_conversation_input_ids(tokenizer, "Hi", template_version="base")
    second = build_conversation_input_ids(
        tokenizer, "CAPTCHA:", images=1, image_token_count=model.config.num_image_tokens
    )
    second["images"] = image
    return [first, second]


def _reference_logits(model, input_ids, token_type_ids, images):
    """The published forward restated plainly for one unpadded sample: explicit softmax attention, one expert
    choice per token in a Python loop, rotate-half rotary, grouped KV heads h // group."""
    config, vision, params = model.config, model.config.vision_config, dict(model.named_parameters())

    def linear(x, name):
        return x @ params[name + ".weight"].T + (params[name + ".bias"] if name + ".bias" in params else 0)

    def layer_norm(x, name, eps):
        return F.layer_norm(x, x.shape[-1:], params[name + ".weight"], params[name + ".bias"], eps)

    def attention(q, k, v, causal):  # [L, heads, d] each
        scores = torch.einsum("qhd,khd->hqk", q, k) / q.shape[-1] ** 0.5
        if causal:
            scores = scores.masked_fill(torch.ones_like(scores[0], dtype=torch.bool).triu(1), float("-inf"))
        return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).flatten(1)

    # EVA2-CLIP: CLS + patches + positions, post-norm blocks, CLS dropped, (CogVLM2) 2x2 conv, GLU, boi/eoi.
    def vis(name):
        return params["model.vision." + name]

    patches = vis("patch_embedding.proj.weight"), vis("patch_embedding.proj.bias")
    x = F.conv2d(images, *patches, stride=vision["patch_size"])[0].flatten(1).T
    x = torch.cat((vis("patch_embedding.cls_embedding"), x)) + vis("patch_embedding.position_embedding.weight")
    for j in range(vision["num_hidden_layers"]):
        layer = f"model.vision.transformer.layers.{j}."
        q, k, v = linear(x, layer + "attention.query_key_value").view(len(x), 3, vision["num_heads"], -1).unbind(1)
        attn = linear(attention(q, k, v, causal=False), layer + "attention.dense")
        x = x + layer_norm(attn, layer + "input_layernorm", 1e-6)
        mlp = linear(F.gelu(linear(x, layer + "mlp.fc1")), layer + "mlp.fc2")
        x = x + layer_norm(mlp, layer + "post_attention_layernorm", 1e-6)
    x = x[1:]
    if config.vision_downsample:
        grid = int(len(x) ** 0.5)
        x = F.conv2d(x.T.reshape(1, -1, grid, grid), vis("conv.weight"), vis("conv.bias"), stride=2)[0].flatten(1).T
    glu = "model.vision.linear_proj."
    x = F.gelu(layer_norm(linear(x, glu + "linear_proj"), glu + "norm1", 1e-5))
    x = linear(F.silu(linear(x, glu + "gate_proj")) * linear(x, glu + "dense_h_to_4h"), glu + "dense_4h_to_h")
    features = torch.cat((vis("boi")[0], x, vis("eoi")[0]))

    types = token_type_ids[0].tolist()
    length, heads, kv_heads, d = len(types), config.num_attention_heads, config.num_key_value_heads, config.head_dim
    experts = ["vision" if t + 1 < length and types[t] == types[t + 1] == 1 else "language" for t in range(length)]
    h = params["model.embed_tokens.weight"][input_ids[0]].clone()
    h[token_type_ids[0] == 1] = features
    positions = build_position_ids(token_type_ids)[0].float()
    angles = positions[:, None] * config.rope_theta ** (-torch.arange(0, d, 2).float() / d)
    cos, sin = torch.cat((angles, angles), -1).cos()[:, None], torch.cat((angles, angles), -1).sin()[:, None]

    def rotary(x):
        return x * cos + torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1) * sin

    def rms_norm(x, name):
        return params[name + ".weight"] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    def per_token(x, name):  # name has "{}" where the expert goes
        return torch.stack([linear(x[t], name.format(experts[t])) for t in range(length)])

    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        qkv = per_token(rms_norm(h, layer + "input_layernorm"), layer + "self_attn.{}_expert_query_key_value")
        q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], -1)
        q, k, v = rotary(q.view(length, heads, d)), rotary(k.view(length, kv_heads, d)), v.view(length, kv_heads, d)
        kv_of_head = [head // (heads // kv_heads) for head in range(heads)]
        out = attention(q, k[:, kv_of_head], v[:, kv_of_head], causal=True)
        h = h + per_token(out, layer + "self_attn.{}_expert_dense")
        x = rms_norm(h, layer + "post_attention_layernorm")
        gate, up = per_token(x, layer + "mlp.{}_mlp.gate_proj"), per_token(x, layer + "mlp.{}_mlp.up_proj")
        h = h + per_token(F.silu(gate) * up, layer + "mlp.{}_mlp.down_proj")
    return linear(rms_norm(h, "model.norm"), "lm_head")[None]


@pytest.mark.parametrize("cogvlm2", [False, True])
def test_forward_matches_plain_reference(cogvlm2):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_cogvlm(seed=5, cogvlm2=cogvlm2, initializer_range=SHARP_INIT)
    sample = _prompts(tokenizer, model)[1]
    inputs = {key: value[None] for key, value in sample.items()}
    with torch.no_grad():
        logits = model(**inputs).logits
        expected = _reference_logits(model, inputs["input_ids"], inputs["token_type_ids"], inputs["images"])
        published_format = model(**{**inputs, "images": [[sample["images"]]]}).logits  # one image list per sample
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(published_format, logits)


def _left_padded_prompts(cogvlm2: bool):
    """The tiny model (seed 3) and its two prompts, alone and collated into one left-padded batch."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_cogvlm(seed=3, cogvlm2=cogvlm2, initializer_range=SHARP_INIT)
    samples = _prompts(tokenizer, model)
    batch = collate_left_padded(samples, tokenizer.pad_token_id)
    assert batch["attention_mask"][0, 0] == 0  # the first prompt is left-padded
    return model, samples, batch


@pytest.mark.parametrize("cogvlm2", [False, True])
def test_greedy_generation_cache_and_batching(cogvlm2):
    model, samples, batch = _left_padded_prompts(cogvlm2)
    kwargs = dict(max_new_tokens=6, eos_token_id=-1)  # no EOS: always 6 tokens
    cached = model.greedy_generate(**batch, use_cache=True, **kwargs)
    uncached = model.greedy_generate(**batch, use_cache=False, **kwargs)
    assert cached.shape == (2, 6)
    assert torch.equal(cached, uncached)
    for row, sample in enumerate(samples):
        alone = {key: value[None] for key, value in sample.items() if key != "images"}
        images = sample["images"][None] if "images" in sample else None
        assert torch.equal(model.greedy_generate(**alone, images=images, **kwargs)[0], cached[row])

    # A sample stops after its EOS; its later slots are padding, the other sample goes on.
    eos = int(cached[0, 1])
    stopped = model.greedy_generate(**batch, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert stopped[0].tolist()[:2] == cached[0, :2].tolist() and set(stopped[0, 2:].tolist()) <= {0}
    first_eos = (cached[1] == eos).nonzero()
    end = int(first_eos[0]) + 1 if len(first_eos) else 6
    assert stopped.shape[1] == max(2, end)
    assert stopped[1, :end].tolist() == cached[1, :end].tolist()


@pytest.mark.parametrize("cogvlm2", [False, True])
def test_kv_cache_logits_match_full_forward(cogvlm2):
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_cogvlm(seed=4, cogvlm2=cogvlm2, initializer_range=SHARP_INIT)
    batch = collate_left_padded(_prompts(tokenizer, model), tokenizer.pad_token_id)
    new_tokens = torch.tensor([[5, 9, 2], [7, 7, 40]])
    with torch.no_grad():
        out = model(**batch, use_cache=True)
        cache, mask, step_logits = out.past_key_values, batch["attention_mask"], [out.logits[:, -1]]
        for step in range(new_tokens.shape[1]):
            mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
            out = model(input_ids=new_tokens[:, step : step + 1], attention_mask=mask, past_key_values=cache)
            cache = out.past_key_values
            step_logits.append(out.logits[:, -1])
        full = model(
            input_ids=torch.cat((batch["input_ids"], new_tokens), dim=1),
            token_type_ids=torch.cat((batch["token_type_ids"], torch.zeros_like(new_tokens)), dim=1),
            attention_mask=mask,
            images=batch["images"],
        )
    torch.testing.assert_close(torch.stack(step_logits, dim=1), full.logits[:, -4:], rtol=1e-4, atol=1e-4)


def test_image_token_count_mismatch_is_reported():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_cogvlm()
    sample = build_conversation_input_ids(tokenizer, "CAPTCHA:", images=1, image_token_count=5)
    inputs = {key: value[None] for key, value in sample.items()}
    with pytest.raises(ValueError, match="image_token_count=6"):
        model(**inputs, images=torch.zeros(1, 3, 28, 28))
    with pytest.raises(ValueError, match="no images"):
        model(**inputs)


@pytest.mark.parametrize("cogvlm2", [False, True])
def test_save_and_load_sharded(tmp_path, cogvlm2):
    save_tiny_cogvlm(tmp_path, seed=0, cogvlm2=cogvlm2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((tmp_path / shard).exists() for shard in shards)
    reference = build_tiny_cogvlm(seed=0, cogvlm2=cogvlm2)
    assert set(index["weight_map"]) == set(reference.state_dict())

    loaded = CogVLMForCausalLM.from_pretrained(tmp_path).eval()
    architecture = ("num_key_value_heads", "rope_theta", "vision_expert_qkv_bias", "vision_downsample", "vision_config")
    assert {key: getattr(loaded.config, key) for key in architecture} == {
        key: getattr(reference.config, key) for key in architecture
    }
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    batch = collate_left_padded(_prompts(tokenizer, reference), tokenizer.pad_token_id)
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, reference(**batch).logits)


def test_tiny_tokenizer_round_trip(tmp_path):
    tokenizer = build_tiny_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert len(tokenizer) == build_tiny_cogvlm().config.vocab_size
    label = string.ascii_letters + string.digits
    ids = tokenizer.encode(label, add_special_tokens=False)
    assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids) == label
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in (label, "Question: What is 2+2? Answer:", "a  b\nc"):
        assert reloaded.encode(text) == tokenizer.encode(text)
        assert reloaded.decode(reloaded.encode(text), skip_special_tokens=True) == text


def test_prompt_templates():
    assert history_to_prompt("base", None, "CAPTCHA:") == "CAPTCHA:"
    assert history_to_prompt("chat", None, "What is it?") == "Question: What is it? Answer:"
    assert history_to_prompt("vqa", None, "What is it?") == "Question: What is it? Short answer:"
    assert (
        history_to_prompt("chat", [("Hi", "Hello")], "What is it?")
        == "Question: Hi Answer: Hello\nQuestion: What is it? Answer:"
    )
    with pytest.raises(ValueError):
        history_to_prompt("nope", None, "q")


def test_prompt_ids_labels_and_collate():
    tokenizer = build_tiny_tokenizer()
    sample = build_conversation_input_ids(tokenizer, "CAPTCHA:", images=1, image_token_count=6, answer="aB3")
    prompt_ids = tokenizer.encode("CAPTCHA:", add_special_tokens=False)
    answer_ids = tokenizer.encode("aB3", add_special_tokens=False)
    assert sample["input_ids"].tolist() == [1] + [0] * 6 + prompt_ids + answer_ids + [2]
    assert sample["token_type_ids"].tolist() == [0] + [1] * 6 + [0] * (len(prompt_ids) + len(answer_ids) + 1)
    assert sample["labels"].tolist() == [IGNORE_INDEX] * (7 + len(prompt_ids)) + answer_ids + [2]
    assert tokenizer.decode(sample["labels"][sample["labels"] != IGNORE_INDEX], skip_special_tokens=True) == "aB3"
    with pytest.raises(ValueError, match="image_token_count"):
        build_conversation_input_ids(tokenizer, "q", images=1)

    short = build_conversation_input_ids(tokenizer, "q", answer="x")
    batch = collate_left_padded([short, sample], pad_token_id=0)
    pad = len(sample["input_ids"]) - len(short["input_ids"])
    assert batch["input_ids"][0].tolist() == [0] * pad + short["input_ids"].tolist()
    assert batch["attention_mask"][0].tolist() == [0] * pad + [1] * len(short["input_ids"])
    assert batch["token_type_ids"][0, :pad].tolist() == [0] * pad
    assert batch["labels"][0, :pad].tolist() == [IGNORE_INDEX] * pad
    assert torch.equal(batch["labels"][1], sample["labels"])


def test_preprocess_image():
    image = Image.new("RGB", (60, 30), color=(255, 0, 128))
    pixels = preprocess_image(image, image_size=28)
    assert pixels.shape == (3, 28, 28)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (torch.tensor([255, 0, 128]) / 255.0 - mean) / std
    torch.testing.assert_close(pixels.mean((1, 2)), expected, atol=1e-5, rtol=0)



def _generate_new_tokens(model, batch, **kwargs):
    out = model.generate(**batch, pad_token_id=0, **kwargs)
    return out[:, batch["input_ids"].shape[1]:]


@pytest.mark.parametrize("cogvlm2", [False, True])
def test_transformers_generate_equals_the_kit_greedy_decoding(cogvlm2):
    model, samples, batch = _left_padded_prompts(cogvlm2)
    reference = model.greedy_generate(**batch, max_new_tokens=6, eos_token_id=-1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        endless = dict(max_new_tokens=6, eos_token_id=model.config.vocab_size + 1)  # an id never produced: 6 tokens
        greedy = _generate_new_tokens(model, batch, do_sample=False, **endless)
        assert torch.equal(greedy, reference)
        assert torch.equal(_generate_new_tokens(model, batch, do_sample=False, use_cache=False, **endless), reference)
        for row, sample in enumerate(samples):  # each prompt alone gives what it gives in the padded batch
            alone = {key: value[None] for key, value in sample.items()}
            assert torch.equal(_generate_new_tokens(model, alone, do_sample=False, **endless)[0], reference[row])
        # EOS: a sample stops after it and is padded, as the kit's loop does
        eos = int(reference[0, 1])
        stopped = _generate_new_tokens(model, batch, do_sample=False, max_new_tokens=6, eos_token_id=eos)
        expected = model.greedy_generate(**batch, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
        assert torch.equal(stopped, expected)
        # sampling: the same draws with and without the cache; top_k=1 is greedy
        sampled = []
        for use_cache in (True, False):
            torch.manual_seed(7)
            sampled.append(_generate_new_tokens(model, batch, do_sample=True, top_k=0, use_cache=use_cache, **endless))
        assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], reference)
        torch.manual_seed(7)
        assert torch.equal(_generate_new_tokens(model, batch, do_sample=True, top_k=1, **endless), reference)


@pytest.mark.parametrize("cogvlm2", [False, True])
def test_rotary_tables_stay_float32_in_a_bf16_model(cogvlm2, tmp_path):
    model = build_tiny_cogvlm(cogvlm2=cogvlm2, hidden_size=512, num_attention_heads=4)  # head_dim 128, as real
    positions = torch.arange(0, 8192, 7)[None]
    cos32, sin32 = model.model.rotary_emb(positions, torch.float32)
    model.to(torch.bfloat16)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    cos16, sin16 = model.model.rotary_emb(positions, torch.bfloat16)
    assert cos16.dtype == torch.bfloat16
    assert torch.equal(cos16, cos32.to(torch.bfloat16)) and torch.equal(sin16, sin32.to(torch.bfloat16))
    # What the test guards against: angles from a bf16 inv_freq drift far (up to ~1 at these positions).
    drifted = (positions[..., None].float() * model.model.rotary_emb.compute_inv_freq().bfloat16().float()).cos()
    assert (drifted - cos32[0, 0, :, :64]).abs().max() > 0.1
    # A bf16 checkpoint loaded with dtype=bfloat16 builds the same float32 table.
    save_tiny_cogvlm(tmp_path, cogvlm2=cogvlm2)
    loaded = CogVLMForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert loaded.model.rotary_emb.inv_freq.dtype == torch.float32
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq, loaded.model.rotary_emb.compute_inv_freq(), rtol=0,
                               atol=0)
