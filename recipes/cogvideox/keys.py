"""CogVideoX module names as other tools spell them, for `finetune.lora_formats.files` (docs/lora-formats.md#native-comfyui).

Native ComfyUI (CogVideoX support added in ComfyUI PR #13402): `transformer_blocks.N.attn1.to_q/to_k/to_v` ->
`blocks.N.q/k/v`, `attn1.to_out.0` -> `attn_out`, `attn1.norm_q/norm_k` -> `norm_q/norm_k`, `ff.net.0.proj` ->
`ff_proj`, `ff.net.2` -> `ff_out`, `norm1.*`/`norm2.*` unchanged; at the top `time_embedding.linear_1/2` ->
`time_embedding_linear_1/2`, `ofs_embedding.linear_1/2` -> `ofs_embedding_linear_1/2`, everything else unchanged.
Its LoRA keys carry the prefix `diffusion_model.`.

SAT (THUDM/CogVideo `sat/`, exported by `tools/export_sat_lora_weight.py`): `model.diffusion_model.transformer.
layers.N.attention.query_key_value.matrix_{A,B}.{0,1,2}` are q/k/v, `attention.dense.matrix_{A,B}.0` the output
projection; alpha 1 (scale 1 / rank).
"""

from __future__ import annotations

from finetune.lora_formats.files import LoraNames, NameMap, query_widths

BLOCK = "transformer_blocks.{n}."
NATIVE = "blocks.{n}."

NATIVE_PAIRS = [
    (BLOCK + "attn1.to_q", NATIVE + "q"),
    (BLOCK + "attn1.to_k", NATIVE + "k"),
    (BLOCK + "attn1.to_v", NATIVE + "v"),
    (BLOCK + "attn1.to_out.0", NATIVE + "attn_out"),
    (BLOCK + "attn1.norm_q", NATIVE + "norm_q"),
    (BLOCK + "attn1.norm_k", NATIVE + "norm_k"),
    (BLOCK + "ff.net.0.proj", NATIVE + "ff_proj"),
    (BLOCK + "ff.net.2", NATIVE + "ff_out"),
    (BLOCK + "norm1.linear", NATIVE + "norm1.linear"),
    (BLOCK + "norm1.norm", NATIVE + "norm1.norm"),
    (BLOCK + "norm2.linear", NATIVE + "norm2.linear"),
    (BLOCK + "norm2.norm", NATIVE + "norm2.norm"),
    ("time_embedding.linear_1", "time_embedding_linear_1"),
    ("time_embedding.linear_2", "time_embedding_linear_2"),
    ("ofs_embedding.linear_1", "ofs_embedding_linear_1"),
    ("ofs_embedding.linear_2", "ofs_embedding_linear_2"),
    *((name, name) for name in ("patch_embed.proj", "patch_embed.text_proj", "norm_final", "norm_out.linear",
                                "norm_out.norm", "proj_out")),
]

SAT_LAYER = "transformer.layers.{n}.attention."
SAT_PAIRS = [
    (BLOCK + "attn1.to_q", SAT_LAYER + "query_key_value#0"),
    (BLOCK + "attn1.to_k", SAT_LAYER + "query_key_value#1"),
    (BLOCK + "attn1.to_v", SAT_LAYER + "query_key_value#2"),
    (BLOCK + "attn1.to_out.0", SAT_LAYER + "dense#0"),
]

COGVIDEOX_LORA_NAMES = LoraNames(modules=NameMap(NATIVE_PAIRS), prefix="transformer.",
                                 native_prefix="diffusion_model.", sat=NameMap(SAT_PAIRS),
                                 sat_prefix="model.diffusion_model.")


def sat_key(module: str, part: str) -> str:
    """The SAT checkpoint key of `module`'s LoRA matrix `part` ("A" or "B")."""
    matrix, split = COGVIDEOX_LORA_NAMES.sat.to_theirs(module).split("#")
    return f"{COGVIDEOX_LORA_NAMES.sat_prefix}{matrix}.matrix_{part}.{split}"


#: CogVideoX's hidden sizes: 2B 1920 (30 heads x 64), 5B and 1.5-5B 3072 (48 x 64)
HIDDEN_SIZES = {1920: "CogVideoX-2B", 3072: "CogVideoX-5B or CogVideoX1.5-5B"}
VARIANTS = "text- or image-to-video: an attention LoRA has the same shapes in each"


def recognize_cogvideox_lora(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """Names only CogVideoX has (native ComfyUI or SAT keys, the time or ofs embedding), else its hidden size."""
    keys = list(shapes)
    if any("ofs_embedding" in k for k in keys):
        return "CogVideoX1.5-5B image-to-video (ofs_embedding)"
    if any(k.startswith(("diffusion_model.blocks.", "model.diffusion_model.transformer.layers.")) or "time_embedding" in k
           for k in keys):
        return f"CogVideoX ({VARIANTS})"
    widths = query_widths(shapes)
    if len(widths) == 1 and next(iter(widths)) in HIDDEN_SIZES:
        return f"{HIDDEN_SIZES[next(iter(widths))]} ({VARIANTS})"
    return None
