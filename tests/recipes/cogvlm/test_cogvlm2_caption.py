"""Native CogVLM2-Video / CogVLM2-Caption: frame sampling, prompt layout, positions, batching, saved layout, and
equality with the published `modeling_cogvlm.py` of THUDM/cogvlm2-llama3-caption on a tiny config.

The published file is not in this repository (its code is THUDM's). `test_equals_the_published_modeling_code` runs
it when it is on disk: the path in COGVLM2_CAPTION_MODELING, else the file of a downloaded
THUDM/cogvlm2-llama3-caption in the Hugging Face cache. The copy checked while writing this recipe is
csbhr/Vivid-VR `VRDiT/cogvlm2-llama3-caption/modeling_cogvlm.py` (docs/cogvlm.md#cogvlm2-caption). It is imported as
a plain module (no trust_remote_code) beside three stand-ins for what that copy lacks or cannot run here: its
`configuration_cogvlm` (the kit's CogVLMConfig, the same config.json keys), `visual.EVA2CLIPModel` (the kit's vision
tower, checked against the restated CogVLM2 `visual.py` in test_cogvlm_model.py) and `util.FastRotaryEmbedding` (a
triton kernel: restated below in plain torch), plus torchvision's video transforms and einops' one `rearrange`
when they are absent.
"""

import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from recipes.cogvlm import build_position_ids, build_tiny_tokenizer, collate_left_padded
from recipes.cogvlm.caption import save_tiny_caption_model, tiny_caption_config
from recipes.cogvlm.video_cogvlm import (
    CAPTION_PROMPT,
    CogVLMVideoForCausalLM,
    build_video_conversation_input_ids,
    preprocess_video,
    sample_frame_indices,
)

SHARP_INIT = 0.3  # as test_cogvlm_model.py: a larger init std makes the tiny model sensitive to position bugs
PUBLISHED_PAD = 128002  # Llama-3's pad id, hard-coded by the published prompt builder and embedding


def _frames(count=3, size=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size + 8, 3), dtype=np.uint8)


def test_frame_sampling_is_the_demos_chat_strategy():
    # 17 frames at 8 fps (the demo clips): seconds 0, 1, 2 -> frames 0, 8, 16.
    assert sample_frame_indices([i / 8 for i in range(17)]) == [0, 8, 16]
    # 24 fps, 100 s: one frame per second, capped at 24.
    assert sample_frame_indices([i / 24 for i in range(2400)]) == [24 * s for s in range(24)]
    # 0.4 s clip: round(0.4) + 1 = 1 second -> the first frame only; ties go to the first frame.
    assert sample_frame_indices([0.0, 0.2, 0.4]) == [0]
    assert sample_frame_indices([0.0, 0.5, 1.0, 1.5]) == [0, 2, 3]  # second 2: 1.5 is the closest
    assert sample_frame_indices([i / 10 for i in range(25)], strategy="base", num_frames=3) == [0, 12, 24]


def test_prompt_layout_and_positions():
    tokenizer = build_tiny_tokenizer()
    sample = build_video_conversation_input_ids(tokenizer, CAPTION_PROMPT, num_frames=2, tokens_per_frame=4)
    ids, types = sample["input_ids"].tolist(), sample["token_type_ids"].tolist()
    zero, one = (tokenizer.encode(d, add_special_tokens=False) for d in "01")
    text = tokenizer.encode(f"Question: {CAPTION_PROMPT} Answer:", add_special_tokens=False)
    pad = tokenizer.pad_token_id
    assert ids == [tokenizer.bos_token_id, *[pad] * 4, *zero, *[pad] * 4, *one, *text]
    assert types == [0, 1, 1, 1, 1, *[0] * len(zero), 1, 1, 1, 1, *[0] * len(one), *[0] * len(text)]
    # Published rule per frame: boi +1, the first patch +1, the other patches share it, eoi +1; text counts on.
    t = len(zero)
    frame0, frame1 = [1, 2, 2, 3], [4 + t, 5 + t, 5 + t, 6 + t]
    expected = [0, *frame0, *range(4, 4 + t), *frame1, *range(7 + t, 7 + 2 * t + len(text))]
    assert build_position_ids(sample["token_type_ids"][None])[0].tolist() == expected


def test_preprocess_video_scales_the_short_side_and_crops_the_centre():
    frames = _frames(count=2, size=40)  # 40 x 48
    video = preprocess_video(frames, 32)
    assert video.shape == (2, 3, 32, 32)
    # short side 40 -> 32, long side floor(48 / 40 * 32) = 38, centre crop columns 3 .. 35
    pixels = torch.as_tensor(frames).permute(0, 3, 1, 2).float() / 255
    scaled = torch.nn.functional.interpolate(pixels, size=(32, 38), mode="bilinear", align_corners=False)
    mean, std = torch.tensor([0.48145466, 0.4578275, 0.40821073]), torch.tensor([0.26862954, 0.26130258, 0.27577711])
    expected = (scaled[..., 3:35] - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(video, expected)


def _model(**overrides):
    torch.manual_seed(3)
    return CogVLMVideoForCausalLM(tiny_caption_config(initializer_range=SHARP_INIT, **overrides)).eval()


def _video_sample(tokenizer, model, frames, pad=None, query=CAPTION_PROMPT):
    video = preprocess_video(frames, model.config.vision_config["image_size"])
    sample = build_video_conversation_input_ids(tokenizer, query, len(video), model.config.num_image_tokens,
                                                pad_token_id=pad)
    return sample, video


def test_a_batch_of_videos_equals_each_alone():
    tokenizer, model = build_tiny_tokenizer(), _model()
    assert model.config.num_image_tokens == 66  # the released per-frame layout (64 patches + boi + eoi)
    samples = [_video_sample(tokenizer, model, _frames(n, seed=n), query=q) for n, q in ((2, "Describe."), (3, "Hi"))]
    batch = collate_left_padded([s for s, _ in samples], tokenizer.pad_token_id)
    with torch.no_grad():
        together = model.generate(**batch, images=[v for _, v in samples], max_new_tokens=4, do_sample=False,
                                  eos_token_id=-1)[:, batch["input_ids"].shape[1]:]
        for row, (sample, video) in enumerate(samples):
            alone = {k: v[None] for k, v in sample.items()}
            tokens = model.generate(**alone, images=[[video]], max_new_tokens=4, do_sample=False, eos_token_id=-1)
            assert torch.equal(tokens[0, alone["input_ids"].shape[1]:], together[row])
            assert torch.equal(model.greedy_generate(**alone, images=video, max_new_tokens=4, eos_token_id=-1)[0],
                               together[row])


def test_released_checkpoint_names_and_shapes():
    """The tensors THUDM/cogvlm2-llama3-caption's safetensors list (names and shapes as its index shows them)."""
    from recipes.cogvlm.configuration_cogvlm import CogVLMConfig

    config = CogVLMConfig(architectures=["CogVLMVideoForCausalLM"], vocab_size=128256, intermediate_size=14336,
                          num_multi_query_heads=8, max_position_embeddings=8192, vision_config={
                              "image_size": 224, "num_positions": 257})
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in CogVLMVideoForCausalLM(config).state_dict().items()}
    assert shapes["model.embed_tokens.weight"] == shapes["lm_head.weight"] == (128256, 4096)
    assert shapes["model.layers.0.mlp.language_mlp.down_proj.weight"] == (4096, 14336)
    assert shapes["model.layers.0.self_attn.language_expert_query_key_value.weight"] == (6144, 4096)
    assert shapes["model.vision.conv.weight"] == (1792, 1792, 2, 2) and shapes["model.vision.boi"] == (1, 1, 4096)
    assert shapes["model.vision.linear_proj.dense_h_to_4h.weight"] == (14336, 4096)
    assert not [k for k in shapes if "vision_expert" in k or "vision_mlp" in k]
    # decoder 32 x 7 + embed, norm, lm_head; EVA2-CLIP 63 x 12 + patch embedding 4 + conv 2 + GLU 6 + boi/eoi 2
    assert len(shapes) == 32 * 7 + 3 + 63 * 12 + 4 + 2 + 6 + 2 == 997
    assert config.num_image_tokens == 66


def test_saved_tiny_model_is_the_published_layout(tmp_path):
    save_tiny_caption_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["CogVLMVideoForCausalLM"]
    assert config["num_multi_query_heads"] == 2 and config["template_version"] == "chat"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert "model.vision.conv.weight" in index["weight_map"]
    # The published video decoder has the language expert only (its vision-expert lines are commented out).
    assert "model.layers.0.self_attn.language_expert_query_key_value.weight" in index["weight_map"]
    assert not [key for key in index["weight_map"] if "vision_expert" in key or "vision_mlp" in key]
    loaded = CogVLMVideoForCausalLM.from_pretrained(tmp_path)
    torch.manual_seed(0)
    reference = CogVLMVideoForCausalLM(tiny_caption_config()).eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


# ---- the published modeling code -------------------------------------------------------------------------------

def _published_file() -> Path | None:
    if os.environ.get("COGVLM2_CAPTION_MODELING"):
        return Path(os.environ["COGVLM2_CAPTION_MODELING"])
    hub = Path(os.environ.get("HF_HUB_CACHE", Path.home() / ".cache" / "huggingface" / "hub"))
    found = sorted(hub.glob("models--THUDM--cogvlm2-llama3-caption/snapshots/*/modeling_cogvlm.py"))
    return found[-1] if found else None


class _PlainRotary(torch.nn.Module):
    """The published util.FastRotaryEmbedding (flash-attn's triton kernel, interleaved=False), restated: angles
    position * base ** (-2i / dim), x1 * cos - x2 * sin | x1 * sin + x2 * cos on the two halves of each head."""

    def __init__(self, dim, base=10000, pos_idx_in_fp32=True, **kwargs):
        super().__init__()
        self.dim, self.base = dim, float(base)

    def forward(self, q, k, position_ids, max_seqlen=None):
        inv_freq = 1.0 / self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float32) / self.dim)
        angles = position_ids.float()[:, None, :, None] * inv_freq  # [B, 1, L, dim / 2]
        cos, sin = angles.cos(), angles.sin()

        def rotate(x):
            x1, x2 = x.float().chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)

        return rotate(q), rotate(k)


def _torchvision_stand_in():
    """Compose, Lambda, NormalizeVideo and CenterCropVideo as torchvision defines them (only when it is absent)."""
    transforms = types.ModuleType("torchvision.transforms")
    video = types.ModuleType("torchvision.transforms._transforms_video")

    class Compose:
        def __init__(self, steps):
            self.steps = steps

        def __call__(self, x):
            for step in self.steps:
                x = step(x)
            return x

    class Lambda:
        def __init__(self, fn):
            self.fn = fn

        def __call__(self, x):
            return self.fn(x)

    class NormalizeVideo:  # clip (C, T, H, W)
        def __init__(self, mean, std):
            self.mean, self.std = torch.tensor(mean), torch.tensor(std)

        def __call__(self, clip):
            return (clip - self.mean.view(-1, 1, 1, 1)) / self.std.view(-1, 1, 1, 1)

    class CenterCropVideo:
        def __init__(self, size):
            self.size = size

        def __call__(self, clip):
            h, w = clip.shape[-2:]
            i, j = int(round((h - self.size) / 2.0)), int(round((w - self.size) / 2.0))
            return clip[..., i:i + self.size, j:j + self.size]

    transforms.Compose, transforms.Lambda = Compose, Lambda
    video.NormalizeVideo, video.CenterCropVideo = NormalizeVideo, CenterCropVideo
    package = types.ModuleType("torchvision")
    package.transforms = transforms
    return {"torchvision": package, "torchvision.transforms": transforms,
            "torchvision.transforms._transforms_video": video}


def _load_published(path: Path, monkeypatch):
    from recipes.cogvlm.configuration_cogvlm import CogVLMConfig
    from recipes.cogvlm.vision_cogvlm import CogVLMVisionModel

    if importlib.util.find_spec("torchvision") is None:
        for name, module in _torchvision_stand_in().items():
            monkeypatch.setitem(sys.modules, name, module)
    if importlib.util.find_spec("einops") is None:  # the one pattern the file uses
        einops = types.ModuleType("einops")

        def rearrange(x, pattern):
            assert pattern == "b n d -> (b n) d", pattern
            return x.reshape(-1, x.shape[-1])

        einops.rearrange = rearrange
        monkeypatch.setitem(sys.modules, "einops", einops)
    package = types.ModuleType("published_cogvlm2_caption")
    package.__path__ = []
    parts = {"configuration_cogvlm": {"CogVLMConfig": CogVLMConfig}, "util": {"FastRotaryEmbedding": _PlainRotary},
             "visual": {"EVA2CLIPModel": CogVLMVisionModel}}
    monkeypatch.setitem(sys.modules, package.__name__, package)
    for name, attributes in parts.items():
        module = types.ModuleType(f"{package.__name__}.{name}")
        module.__dict__.update(attributes)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    spec = importlib.util.spec_from_file_location(f"{package.__name__}.modeling_cogvlm", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


class _Llama3Ids:
    """The tiny tokenizer as the published builder uses one: encode, bos/eos ids, and a pad id it sets to 128002
    (a fast tokenizer refuses an id outside its vocabulary)."""

    def __init__(self, tokenizer):
        self.encode = tokenizer.encode
        self.bos_token_id, self.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id


def _published_greedy(model, inputs, steps):
    """Greedy decoding through the published forward alone (its `generate` needs transformers 4.4x): the whole
    sequence every step, positions from its own build_position_ids, new tokens of language type."""
    ids, types_, mask = inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"]
    tokens = []
    for _ in range(steps):
        logits = model(input_ids=ids, images=inputs["images"], token_type_ids=types_, attention_mask=mask,
                       use_cache=False, return_dict=True).logits
        token = logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
        ids, types_ = torch.cat((ids, token), 1), torch.cat((types_, torch.zeros_like(token)), 1)
        mask = torch.cat((mask, torch.ones_like(token)), 1)
    return torch.cat(tokens, 1)


def test_equals_the_published_modeling_code(monkeypatch):
    path = _published_file()
    if path is None or not path.is_file():
        pytest.skip("the published modeling_cogvlm.py of THUDM/cogvlm2-llama3-caption is not on disk: set "
                    "COGVLM2_CAPTION_MODELING=/path/to/modeling_cogvlm.py")
    published = _load_published(path, monkeypatch)
    tokenizer = build_tiny_tokenizer()
    # The published embedding hard-codes padding_idx 128002 (Llama-3's pad): the vocabulary must be that large.
    native = _model(vocab_size=128256)
    config = native.config
    reference = published.CogVLMVideoForCausalLM(config).eval()
    reference.load_state_dict(native.state_dict(), strict=True)  # the same parameter names, none left over

    frames = _frames(count=3, size=40)
    # The published prompt builder (chat template, time indices) and video transform, on the same frames.
    built = reference.build_conversation_input_ids(_Llama3Ids(tokenizer), query=CAPTION_PROMPT,
                                                   images=[torch.as_tensor(frames).permute(3, 0, 1, 2)],
                                                   template_version="chat")
    sample, video = _video_sample(tokenizer, native, frames, pad=PUBLISHED_PAD)
    for key in ("input_ids", "token_type_ids", "attention_mask"):
        assert torch.equal(built[key], sample[key]), key
    torch.testing.assert_close(built["images"][0], video, rtol=0, atol=1e-6)

    inputs = {k: sample[k][None] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        expected = reference(**inputs, images=[[video]], use_cache=False, return_dict=True).logits
        logits = native(**inputs, images=[[video]]).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert (expected[0, -1] - expected[0, -2]).abs().max() > 1e-3  # the logits are not degenerate
        tokens = _published_greedy(reference, {**inputs, "images": [[video]]}, steps=5)
        native_tokens = native.generate(**inputs, images=[[video]], max_new_tokens=5, do_sample=False,
                                        eos_token_id=-1)[:, inputs["input_ids"].shape[1]:]
    assert torch.equal(native_tokens, tokens)


# What the published code produced on the inputs of test_equals_the_published_modeling_code (recorded 2026-12-07).
RECORDED_TOKENS = [4026, 49137, 3034, 16828, 71977]  # its 5 greedy tokens (_published_greedy)
RECORDED_POSITIONS = [0, 1, 33, 66, 67, 150, 204, 230, 260]  # of 261: bos; frame 0 (1..66) boi, a patch, eoi;
# its time index; a frame-2 patch (frames 1 and 2 are 69..134, 137..202); text after the last frame; the last token
RECORDED_SUM = [-804.04443, -1397.3296, 430.05872, -575.51996, -2213.1711, -469.30566, -143.58267, 1102.3864,
                353.01425]  # logits[p].sum() over the 128256-token vocabulary
RECORDED_MAX = [9.675457, 10.023794, 12.296507, 9.848359, 9.71207, 10.185204, 10.663193, 10.424544, 10.248676]
RECORDED_ARGMAX = [67216, 37644, 78202, 49886, 124501, 24282, 127693, 88892, 4026]
RECORDED_LOGITS = [  # logits[p, v] for v = 0, 1, 128001
    [-1.140654, 2.468174, 0.5854147], [-0.6699423, -1.598425, 2.64007], [0.5459319, 0.7971126, -1.352744],
    [-3.065399, -2.336388, -0.6823636], [-3.638282, -1.674911, 0.9304703], [-1.222508, -1.96333, 0.6711854],
    [-2.833102, -1.141881, 0.3389778], [3.37156, 0.7733082, -3.031143], [0.1623546, 0.3129138, -1.124601]]
RECORDED_TOTAL_SUM, RECORDED_SUM_OF_MAX = -132511.641, 2776.24951  # over all 261 positions


def test_equals_the_published_modeling_codes_recorded_output():
    """The native model reproduces what the published code produced, without the published file (so CI checks it).

    The figures above are the output of THUDM/cogvlm2-llama3-caption's published `modeling_cogvlm.py`, run once on
    2026-12-07 through `test_equals_the_published_modeling_code`'s harness (`_load_published`, its stand-ins and
    `_published_greedy`) on that test's tiny fp32 config (seed 3, SHARP_INIT, vocab 128256), 3 frames of
    `_frames(3, 40)` and CAPTION_PROMPT. The file run was a local copy of the copy named in the module docstring
    (csbhr/Vivid-VR `VRDiT/cogvlm2-llama3-caption/modeling_cogvlm.py`; 42376 bytes, sha256 5c56c7f5803686c4ce71eea
    aadec14ad8cea869d89c44cfb8cd8300d81de99a6); the native model then matched it exactly (max |logit difference| 0),
    and two runs gave the same figures bit for bit. Checked while recording: a rope base of 10000 or 1e6 instead of
    500000, the patches routed to a vision expert (1% off the language expert), or positions counted per token
    each fail the logit figures here (the first two also the tokens).
    """
    tokenizer, native = build_tiny_tokenizer(), _model(vocab_size=128256)
    sample, video = _video_sample(tokenizer, native, _frames(count=3, size=40), pad=PUBLISHED_PAD)
    inputs = {k: sample[k][None] for k in ("input_ids", "token_type_ids", "attention_mask")}
    with torch.no_grad():
        logits = native(**inputs, images=[[video]]).logits[0]
        tokens = native.generate(**inputs, images=[[video]], max_new_tokens=5, do_sample=False,
                                 eos_token_id=-1)[0, inputs["input_ids"].shape[1]:]
    assert logits.shape == (261, 128256)
    at = logits[RECORDED_POSITIONS]
    close = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(at[:, [0, 1, 128001]], torch.tensor(RECORDED_LOGITS), **close)
    torch.testing.assert_close(at.max(-1).values, torch.tensor(RECORDED_MAX), **close)
    torch.testing.assert_close(at.sum(-1), torch.tensor(RECORDED_SUM), **close)
    assert at.argmax(-1).tolist() == RECORDED_ARGMAX
    torch.testing.assert_close(logits.sum(), torch.tensor(RECORDED_TOTAL_SUM), **close)
    torch.testing.assert_close(logits.max(-1).values.sum(), torch.tensor(RECORDED_SUM_OF_MAX), **close)
    assert tokens.tolist() == RECORDED_TOKENS
