"""`cogft inspect` / `cogft convert` (finetune/lora_formats/files.py, recipes/cogvideox/keys.py): every converted file is
loaded by its consumer and gives the trained update; the ComfyUI file's names and `.alpha` follow ComfyUI's rules
(docs/lora-formats.md#loaders-rules), written out independently here."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import perturb_trainable
from safetensors import safe_open
from safetensors.torch import save_file
from test_cogvideox_export import transformer_inputs
from test_cogvideox_objective import tiny_family

from finetune.adapters import LoRA
from finetune.lora_formats.files import LoraFileError
from finetune.cogft import run as cogft
from recipes.cogvideox.keys import sat_key

RANK, ALPHA = 4, 8  # rank != alpha: a lost alpha shows as a factor 2
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "norm1.linear", "time_embedding.linear_1"]


def reference_native(name: str) -> str:
    """docs/lora-formats.md#native-comfyui, diffusers -> native ComfyUI CogVideoX names, written independently of the kit's map."""
    block = re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", name)
    if block:
        n, rest = block.groups()
        rest = {"attn1.to_q": "q", "attn1.to_k": "k", "attn1.to_v": "v", "attn1.to_out.0": "attn_out",
                "attn1.norm_q": "norm_q", "attn1.norm_k": "norm_k", "ff.net.0.proj": "ff_proj",
                "ff.net.2": "ff_out"}.get(rest, rest)
        return f"blocks.{n}.{rest}"
    return name.replace("time_embedding.", "time_embedding_").replace("ofs_embedding.", "ofs_embedding_")


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}


@pytest.fixture(scope="module")
def trained(tiny_cogvideox, tmp_path_factory):
    """A tiny CogVideoX with a non-trivial LoRA on attention, MLP, norm and time-embedding layers, exported as the
    diffusers file and (export_format) the ComfyUI and kohya files; with peft's own deltas."""
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(0)
    family = tiny_family()
    adapter = LoRA(rank=RANK, alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGETS)
    adapter.apply(family.transformer, family.lora_target_modules)
    perturb_trainable(family)
    out = tmp_path_factory.mktemp("export")
    files = {"diffusers": family.export(out, adapter),
             **{fmt: family.export_format(out, adapter, fmt) for fmt in ("comfy", "kohya")}}
    deltas = {name: m.get_delta_weight("default").detach() for name, m in family.transformer.named_modules()
              if isinstance(m, LoraLayer)}
    family.eval()
    with torch.no_grad():
        expected = family.transformer(**transformer_inputs(family))[0]
    return family, out, files, deltas, expected


def base_weights(path) -> dict[str, torch.Tensor]:
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(path, subfolder="transformer").state_dict()


def apply_native(base: dict, file, strength: float = 1.0) -> dict:
    """ComfyUI's rule on native names: `W += strength * alpha / rank * B @ A`, factor 1.0 without `.alpha`."""
    tensors, _ = read(file)
    to_ours = {reference_native(k.removesuffix(".weight")): k.removesuffix(".weight") for k in base}
    weights = dict(base)
    modules = {k.removeprefix("diffusion_model.").rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k}
    for native in modules:
        A, B = tensors[f"diffusion_model.{native}.lora_A.weight"], tensors[f"diffusion_model.{native}.lora_B.weight"]
        alpha_key = f"diffusion_model.{native}.alpha"
        factor = float(tensors[alpha_key]) / A.shape[0] if alpha_key in tensors else 1.0
        key = to_ours[native] + ".weight"
        weights[key] = weights[key] + strength * factor * (B @ A)
    return weights


def diffusers_fused(path, lora_dir) -> dict[str, torch.Tensor]:
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(path)
    pipe.load_lora_weights(lora_dir)
    pipe.fuse_lora(components=["transformer"])
    pipe.unload_lora_weights()
    return pipe.transformer.state_dict()


def test_comfy_keys_are_the_native_module_names(trained):
    family, _, files, deltas, _ = trained
    tensors, header = read(files["comfy"])
    expected = set()
    for module in deltas:  # every adapted module: all blocks, every target
        native = f"diffusion_model.{reference_native(module)}"
        expected |= {f"{native}.lora_A.weight", f"{native}.lora_B.weight", f"{native}.alpha"}
    assert set(tensors) == expected
    assert len(deltas) == 2 * 7 + 1  # 2 blocks x 7 targets + time_embedding.linear_1
    assert {"diffusion_model.blocks.1.attn_out.alpha", "diffusion_model.blocks.0.ff_proj.lora_A.weight",
            "diffusion_model.time_embedding_linear_1.alpha"} <= set(tensors)
    assert all(float(v) == ALPHA for k, v in tensors.items() if k.endswith(".alpha"))
    assert "lora_adapter_metadata" not in header  # native ComfyUI never reads the header


def test_comfy_file_by_comfys_formula_equals_diffusers_loaded_weights(trained, tiny_cogvideox):
    _, out, files, deltas, _ = trained
    base = base_weights(tiny_cogvideox)
    fused = diffusers_fused(tiny_cogvideox, out)
    native = apply_native(base, files["comfy"])
    for key in base:
        torch.testing.assert_close(native[key], fused[key], rtol=1e-5, atol=1e-6)
    for module, delta in deltas.items():  # and both are the trained update
        torch.testing.assert_close(native[f"{module}.weight"] - base[f"{module}.weight"], delta, rtol=1e-4, atol=1e-6)


def test_fold_alpha_gives_the_same_deltas_at_strength_one(trained, tiny_cogvideox, tmp_path):
    _, out, files, deltas, _ = trained
    base = base_weights(tiny_cogvideox)
    folded = cogft(["convert", str(files["diffusers"]), str(tmp_path / "folded.safetensors"), "--to", "comfy",
                    "--fold-alpha"])
    tensors, _ = read(folded)
    assert not any(k.endswith(".alpha") for k in tensors)
    native = apply_native(base, folded, strength=1.0)
    for module, delta in deltas.items():
        torch.testing.assert_close(native[f"{module}.weight"] - base[f"{module}.weight"], delta, rtol=1e-4, atol=1e-6)
    # a folded diffusers file's header says alpha = rank (a loader that ignores it, diffusers 0.33, assumes the same)
    # and keeps what it was trained with aside: diffusers applies the trained update
    plain = cogft(["convert", str(files["diffusers"]), str(tmp_path / "plain"), "--to", "diffusers", "--fold-alpha"])
    header = read(plain)[1]
    assert json.loads(header["lora_adapter_metadata"])["transformer.lora_alpha"] == RANK
    assert json.loads(header["cogft_trained"])["alpha"] == ALPHA
    fused = diffusers_fused(tiny_cogvideox, plain.parent)
    for module, delta in deltas.items():
        torch.testing.assert_close(fused[f"{module}.weight"] - base[f"{module}.weight"], delta, rtol=1e-4, atol=1e-6)


def test_kohya_file_on_the_diffusers_names(trained, tmp_path):
    _, _, files, deltas, _ = trained
    tensors, _ = read(files["kohya"])
    assert "lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_transformer_blocks_1_ff_net_0_proj.alpha" in tensors
    for module, delta in deltas.items():  # the wrapper's rule: alpha / rank * up @ down
        key = "lora_unet_" + module.replace(".", "_")
        down, up = tensors[f"{key}.lora_down.weight"], tensors[f"{key}.lora_up.weight"]
        torch.testing.assert_close(float(tensors[f"{key}.alpha"]) / down.shape[0] * up @ down, delta,
                                   rtol=1e-4, atol=1e-6)
    # and back: kohya and comfy files convert (folded, as the export is written) to the same diffusers file
    for fmt in ("kohya", "comfy"):
        back, _ = read(cogft(["convert", str(files[fmt]), str(tmp_path / fmt), "--to", "diffusers", "--fold-alpha"]))
        original, _ = read(files["diffusers"])
        assert set(back) == set(original)
        for key in original:
            torch.testing.assert_close(back[key], original[key])


def sat_file(path, deltas_like: dict, rank: int, seed: int = 1):
    """A SAT LoRA checkpoint (`mp_rank_00_model_states.pt` layout: {"module": {...}}) for the attention targets."""
    g = torch.Generator().manual_seed(seed)
    module = {}
    for name, delta in deltas_like.items():
        if not re.search(r"attn1\.(to_q|to_k|to_v|to_out\.0)$", name):
            continue
        module[sat_key(name, "A")] = torch.randn(rank, delta.shape[1], generator=g) * 0.3
        module[sat_key(name, "B")] = torch.randn(delta.shape[0], rank, generator=g) * 0.3
    torch.save({"module": module}, path)
    return module


def outputs_with(path, weights: dict, pipeline_class: str = "CogVideoXPipeline", inputs=None):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(path)
    pipe.transformer.load_state_dict(weights)
    with torch.no_grad():
        return pipe.transformer(**inputs)[0]


def loaded_outputs(path, lora_dir, inputs, pipeline_class: str = "CogVideoXPipeline"):
    import diffusers

    pipe = getattr(diffusers, pipeline_class).from_pretrained(path)
    pipe.load_lora_weights(lora_dir, adapter_name="converted")
    with torch.no_grad():
        return pipe.transformer(**inputs)[0], pipe


def test_sat_lora_converts_with_its_own_arithmetic(trained, tiny_cogvideox, tmp_path):
    """SAT applies `B @ A / rank` (alpha 1): the converted file, loaded by diffusers, gives exactly that."""
    family, _, _, deltas, _ = trained
    sat = sat_file(tmp_path / "mp_rank_00_model_states.pt", deltas, rank=RANK)
    assert "model.diffusion_model.transformer.layers.1.attention.query_key_value.matrix_A.2" in sat
    out = cogft(["convert", str(tmp_path / "mp_rank_00_model_states.pt"), str(tmp_path / "sat"), "--to", "diffusers"])
    base = base_weights(tiny_cogvideox)
    weights = dict(base)
    for n in range(2):
        for target, (matrix, split) in {"to_q": ("query_key_value", 0), "to_k": ("query_key_value", 1),
                                        "to_v": ("query_key_value", 2), "to_out.0": ("dense", 0)}.items():
            prefix = f"model.diffusion_model.transformer.layers.{n}.attention.{matrix}"
            A, B = sat[f"{prefix}.matrix_A.{split}"], sat[f"{prefix}.matrix_B.{split}"]
            key = f"transformer_blocks.{n}.attn1.{target}.weight"
            weights[key] = weights[key] + (1 / RANK) * B @ A
    inputs = transformer_inputs(family)
    expected = outputs_with(tiny_cogvideox, weights, inputs=inputs)
    got, _ = loaded_outputs(tiny_cogvideox, out.parent, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    info = cogft(["inspect", str(tmp_path / "mp_rank_00_model_states.pt")])
    assert info["layout"] == "sat" and info["trained_scale"] == 1 / RANK and not info["loaders"]["diffusers"]["loads"]


@pytest.fixture(scope="module")
def tiny_i2v(cache_dir):
    from finetune.hub import resolve_pretrained
    from recipes.cogvideox.tiny import save_tiny_cogvideox

    return resolve_pretrained("tiny", family="cogvideox_i2v",
                              build_tiny=lambda root: save_tiny_cogvideox(root, variant="cogvideox_i2v"))


def i2v_inputs(family):
    inputs = transformer_inputs(family)
    g = torch.Generator().manual_seed(5)
    return {**inputs, "hidden_states": torch.randn(1, 3, 32, 4, 4, generator=g)}


def random_lora(base: dict, modules: list[str], rank: int, seed: int = 2) -> dict[str, tuple]:
    g = torch.Generator().manual_seed(seed)
    return {m: (torch.randn(rank, base[f"{m}.weight"].shape[1], generator=g) * 0.2,
                torch.randn(base[f"{m}.weight"].shape[0], rank, generator=g) * 0.2) for m in modules}


def with_deltas(base: dict, lora: dict, scale: float) -> dict:
    weights = dict(base)
    for m, (A, B) in lora.items():
        weights[f"{m}.weight"] = weights[f"{m}.weight"] + scale * B @ A
    return weights


ATTENTION = [f"transformer_blocks.{n}.attn1.{t}" for n in range(2) for t in ("to_q", "to_k", "to_v", "to_out.0")]


def test_cogkit_adapter_at_its_stated_rank_and_alpha_in_the_i2v_pipeline(trained, tiny_i2v, tmp_path):
    """CogKit's adapter_model.safetensors: no `transformer.` prefix (diffusers loads 0 keys), r 128 / alpha 64 not
    stored. Converted, the I2V pipeline applies it at 64 / 128."""
    family = trained[0]
    base = base_weights(tiny_i2v)
    lora = random_lora(base, ATTENTION, rank=128)
    tensors = {f"{m}.lora_{p}.weight": t for m, (A, B) in lora.items() for p, t in (("A", A), ("B", B))}
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    info = cogft(["inspect", str(tmp_path / "adapter_model.safetensors")])
    assert info["layout"] == "peft-bare" and info["alphas"] == [64.0] and "CogKit" in info["alpha_source"]
    assert not info["loaders"]["diffusers"]["loads"] and not info["loaders"]["comfyui_native"]["loads"]
    out = cogft(["convert", str(tmp_path / "adapter_model.safetensors"), str(tmp_path / "cogkit"), "--to", "diffusers"])
    inputs = i2v_inputs(family)
    expected = outputs_with(tiny_i2v, with_deltas(base, lora, 64 / 128), "CogVideoXImageToVideoPipeline", inputs)
    got, _ = loaded_outputs(tiny_i2v, out.parent, inputs, "CogVideoXImageToVideoPipeline")
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    converted = cogft(["inspect", str(out)])
    assert converted["loaders"]["diffusers"]["scale"] == 0.5 and converted["loaders"]["diffusers"]["strength"] == 1.0


def test_finetrainers_file_at_its_stated_alpha(trained, tiny_cogvideox, tmp_path):
    """finetrainers keeps alpha in its own `lora_config` header, which diffusers does not read (strength x2 here);
    converted, it loads at the stated lora_alpha / r."""
    family = trained[0]
    base = base_weights(tiny_cogvideox)
    lora = random_lora(base, ATTENTION, rank=RANK, seed=3)
    tensors = {f"transformer.{m}.lora_{p}.weight": t for m, (A, B) in lora.items() for p, t in (("A", A), ("B", B))}
    config = {"r": RANK, "lora_alpha": 2, "init_lora_weights": True, "target_modules": ["to_q", "to_k", "to_v",
                                                                                        "to_out.0"]}
    save_file(tensors, str(tmp_path / "finetrainers.safetensors"),
              metadata={"format": "pt", "lora_config": json.dumps(config, indent=4)})
    info = cogft(["inspect", str(tmp_path / "finetrainers.safetensors")])
    assert info["layout"] == "finetrainers" and info["trained_scale"] == 0.5
    assert info["loaders"]["diffusers"]["scale"] == 1.0 and info["loaders"]["diffusers"]["strength"] == 2.0
    out = cogft(["convert", str(tmp_path / "finetrainers.safetensors"), str(tmp_path / "ft"), "--to", "diffusers"])
    inputs = transformer_inputs(family)
    expected = outputs_with(tiny_cogvideox, with_deltas(base, lora, 2 / RANK), inputs=inputs)
    got, _ = loaded_outputs(tiny_cogvideox, out.parent, inputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_diffusers_example_file_without_alpha_needs_alpha(trained, tmp_path, capsys):
    family, _, files, _, _ = trained
    tensors, _ = read(files["diffusers"])
    save_file(tensors, str(tmp_path / "example.safetensors"))  # what the diffusers example script writes
    with pytest.raises(SystemExit, match="--alpha"):
        cogft(["convert", str(tmp_path / "example.safetensors"), str(tmp_path / "x"), "--to", "comfy"])
    out = cogft(["convert", str(tmp_path / "example.safetensors"), str(tmp_path / "x"), "--to", "diffusers",
                 "--alpha", str(ALPHA)])
    again, meta = read(out)
    assert json.loads(meta["lora_adapter_metadata"])["transformer.lora_alpha"] == ALPHA
    with pytest.raises(LoraFileError, match="stores no alpha"):
        from finetune.lora_formats.files import read_lora_file, to_adapter

        to_adapter(read_lora_file(tmp_path / "example.safetensors"), family.lora_names)


@pytest.mark.parametrize("fmt, expected", [
    # loader -> (loads, scale applied to B @ A)
    # the export folds alpha / rank into lora_B: every loader's factor is 1, the trained update
    ("diffusers", {"diffusers": (True, 1.0), "kijai_wrapper": (True, 1.0), "comfyui_native": (False, None),
                   "peft": (False, None)}),
    ("comfy", {"diffusers": (False, None), "kijai_wrapper": (False, None), "comfyui_native": (True, 2.0),
               "peft": (False, None)}),
    # kohya on the diffusers names: native ComfyUI applies only the modules whose name is the same in its spelling
    # (time_embedding.linear_1 -> time_embedding_linear_1), a partial load
    ("kohya", {"diffusers": (False, None), "kijai_wrapper": (True, 2.0), "comfyui_native": (True, 2.0),
               "peft": (False, None)}),
])
def test_inspect_reports_each_loaders_scale(trained, fmt, expected, capsys):
    _, _, files, _, _ = trained
    info = cogft(["inspect", str(files[fmt])])
    folded = fmt == "diffusers"
    assert info["ranks"] == [RANK] and info["alphas"] == [RANK if folded else ALPHA]
    assert info["trained_scale"] == (1.0 if folded else ALPHA / RANK)
    assert info["trained"] == ({"rank": RANK, "alpha": ALPHA, "alpha_folded_into_lora_B": True} if folded else None)
    assert info["tensors"] == {"diffusers": 30, "comfy": 45, "kohya": 45}[fmt] and not info["non_finite"]
    assert set(info["targets"]) >= {"attn1.to_q", "ff.net.2", "norm1.linear"}
    for loader, (loads, scale) in expected.items():
        assert (info["loaders"][loader]["loads"], info["loaders"][loader]["scale"]) == (loads, scale), loader
        if loads:
            assert info["loaders"][loader]["strength"] == 1.0
    printed = capsys.readouterr().out
    assert "ComfyUI (native)" in printed and f"rank        {RANK}" in printed


def test_inspect_on_folded_and_nonfinite_files(trained, tmp_path):
    _, _, files, _, _ = trained
    folded = cogft(["convert", str(files["diffusers"]), str(tmp_path / "f.safetensors"), "--to", "kohya",
                    "--fold-alpha"])
    info = cogft(["inspect", str(folded)])
    assert info["loaders"]["kijai_wrapper"]["scale"] == 1.0 and info["loaders"]["kijai_wrapper"]["strength"] == 1.0
    tensors, meta = read(files["diffusers"])
    key = next(iter(tensors))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"), metadata=meta)
    assert cogft(["inspect", str(tmp_path / "nan.safetensors")])["non_finite"] == [key]
    with pytest.raises(SystemExit, match="NaN"):
        cogft(["convert", str(tmp_path / "nan.safetensors"), str(tmp_path / "n"), "--to", "comfy"])


def test_native_names_cover_every_weight_of_every_cogvideox_variant():
    """Every module with a weight, in a 1.0 and a 1.5-I2V transformer (ofs embedding, patch_size_t): the kit's map
    gives the native name (docs/lora-formats.md#native-comfyui) and maps it back."""
    from diffusers import CogVideoXTransformer3DModel

    from recipes.cogvideox.keys import COGVIDEOX_LORA_NAMES

    names = COGVIDEOX_LORA_NAMES.modules
    common = dict(num_attention_heads=2, attention_head_dim=8, out_channels=16, time_embed_dim=8, text_embed_dim=16,
                  num_layers=3, sample_width=4, sample_height=4, sample_frames=9, max_text_seq_length=8)
    for extra in ({"in_channels": 16}, {"in_channels": 32, "patch_size_t": 2, "ofs_embed_dim": 8}):
        with torch.device("meta"):
            transformer = CogVideoXTransformer3DModel(**common, **extra)
        weights = [n for n, m in transformer.named_modules()
                   if isinstance(getattr(m, "weight", None), torch.nn.Parameter)]
        assert "transformer_blocks.2.ff.net.2" in weights
        for name in weights:
            assert names.to_theirs(name) == reference_native(name), name
            assert names.to_ours(reference_native(name)) == name
            assert names.from_underscored(name.replace(".", "_")) == name
    assert names.to_theirs("ofs_embedding.linear_2") == "ofs_embedding_linear_2"


@pytest.mark.parametrize("command", ["inspect", "export", "convert", "merge", "generate", "push"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_code:
        cogft([command, "--help"])
    assert exit_code.value.code == 0 and f"usage: cogft {command}" in capsys.readouterr().out


def test_inspects_diffusers_verdict_is_what_diffusers_does(trained, tiny_cogvideox, tmp_path):
    """The installed diffusers, on every layout the kit writes: loads (and at the reported scale) or not."""
    from diffusers import CogVideoXPipeline

    _, _, files, _, _ = trained
    folded = cogft(["convert", str(files["diffusers"]), str(tmp_path / "folded.safetensors"), "--to", "comfy",
                    "--fold-alpha"])
    for path in [*files.values(), folded]:
        verdict = cogft(["inspect", str(path)])["loaders"]["diffusers"]
        pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
        try:
            pipe.load_lora_weights(path, adapter_name="x")
        except ValueError:
            pass
        config = getattr(pipe.transformer, "peft_config", {}).get("x")
        assert verdict["loads"] == (config is not None), path
        if config is not None:
            assert verdict["scale"] == config.lora_alpha / config.r


def test_native_names_in_kohya_spelling(trained, tmp_path):
    """`lora_unet_blocks_0_q.lora_down/lora_up` (native names, kohya spelling): native ComfyUI reads it, the wrapper
    (diffusers names only) does not, and it converts to the same diffusers file."""
    _, _, files, _, _ = trained
    tensors, _ = read(files["comfy"])
    suffixes = {".lora_A.weight": ".lora_down.weight", ".lora_B.weight": ".lora_up.weight", ".alpha": ".alpha"}
    spelled = {}
    for key, value in tensors.items():
        suffix = next(s for s in suffixes if key.endswith(s))
        module = key.removeprefix("diffusion_model.").removesuffix(suffix)
        spelled["lora_unet_" + module.replace(".", "_") + suffixes[suffix]] = value
    assert "lora_unet_blocks_0_q.lora_down.weight" in spelled
    save_file(spelled, str(tmp_path / "spelled.safetensors"))
    info = cogft(["inspect", str(tmp_path / "spelled.safetensors")])
    assert info["loaders"]["comfyui_native"]["loads"] and info["loaders"]["comfyui_native"]["scale"] == ALPHA / RANK
    assert not info["loaders"]["kijai_wrapper"]["loads"]
    back, _ = read(cogft(["convert", str(tmp_path / "spelled.safetensors"), str(tmp_path / "d"), "--to", "diffusers",
                          "--fold-alpha"]))
    original, _ = read(files["diffusers"])
    assert set(back) == set(original) and all(torch.equal(back[k], original[k]) for k in original)


def full_header_file(family, adapter_name: str, path):
    """A diffusers LoRA as the kit wrote it before its folded export, and as other tools write it: lora_B as trained,
    the installed peft's whole `LoraConfig.to_dict()` in the header."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(family.transformer, adapter_name=adapter_name)
    type(family.pipe).save_lora_weights(path, transformer_lora_layers=state,
                                        transformer_lora_adapter_metadata=family.transformer.peft_config[
                                            adapter_name].to_dict())
    return path / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("diffusers, peft, loads, strength, why", [
    ("0.33.1", "0.21.2", True, 1 / (ALPHA / RANK), "never reads"),  # alpha = rank: the trained scale lost
    ("0.34.0", "0.20.0", False, None, "kasa_config"),               # a field that peft lacks: TypeError
    ("0.35.2", "0.17.1", False, None, "has no"),
    ("0.42.1", "0.21.2", True, 1.0, "from lora_adapter_metadata"),
])
def test_inspect_claims_depend_on_the_named_versions(trained, tmp_path, diffusers, peft, loads, strength, why):
    """The rules bench/compat.py measured (docs/compatibility.md), for a full-header file and the kit's export."""
    family, _, files, _, _ = trained
    old = full_header_file(family, "default", tmp_path)
    claim = cogft(["inspect", str(old), "--diffusers-version", diffusers, "--peft-version", peft])["loaders"]
    for loader in ("diffusers", "kijai_wrapper"):
        assert claim[loader]["loads"] is loads and why in claim[loader]["note"], claim[loader]
        assert claim[loader].get("strength") == (None if strength is None else pytest.approx(strength))
    export = cogft(["inspect", str(files["diffusers"]), "--diffusers-version", diffusers, "--peft-version", peft])
    assert export["versions"] == {"diffusers": diffusers, "peft": peft}
    assert all(export["loaders"][name]["strength"] == 1.0 for name in ("diffusers", "kijai_wrapper"))


def test_the_installed_diffusers_does_what_inspect_claims(trained, tiny_cogvideox, tmp_path):
    """The claim for the installed versions, checked on the real loader: the full-header file at its strength."""
    family, _, _, deltas, _ = trained
    old = full_header_file(family, "default", tmp_path)
    claim = cogft(["inspect", str(old)])["loaders"]["diffusers"]
    assert claim["loads"] and claim["strength"] == 1.0  # diffusers 0.42 + peft 0.21 (the kit's pins)
    base = base_weights(tiny_cogvideox)
    fused = diffusers_fused(tiny_cogvideox, old.parent)
    for module, delta in deltas.items():
        torch.testing.assert_close(fused[f"{module}.weight"] - base[f"{module}.weight"], claim["strength"] * delta,
                                   rtol=1e-4, atol=1e-6)


def test_convert_to_comfy_refuses_a_model_native_comfyui_does_not_run(trained, tmp_path):
    _, _, files, _, _ = trained
    with pytest.raises(SystemExit, match=r"^error: cogft convert: --to comfy --family cogview4: native ComfyUI does "
                                         r"not run this model"):
        cogft(["convert", str(files["diffusers"]), str(tmp_path / "c.safetensors"), "--to", "comfy",
               "--family", "cogview4"])
    assert not (tmp_path / "c.safetensors").exists()


@pytest.mark.parametrize("keys, family", [
    ({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 3072),
      "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": (3072, 4)}, "cogvideox"),       # 5B / 1.5 width
    ({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 1920),
      "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": (1920, 4)}, "cogvideox"),       # 2B width
    ({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 4096),
      "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": (4096, 4)}, "cogview4"),        # 6B width
    ({"lora_unet_transformer_blocks_0_attn1_to_q.lora_down.weight": (4, 4096),
      "lora_unet_transformer_blocks_0_attn1_to_q.lora_up.weight": (4096, 4)}, "cogview4"),         # kohya spelling
    ({"diffusion_model.blocks.0.q.lora_A.weight": (4, 64), "diffusion_model.blocks.0.q.lora_B.weight": (64, 4)},
     "cogvideox"),                                                                                   # native names
    ({"transformer.transformer_blocks.0.attn1.to_q.lora_A.weight": (4, 64),
      "transformer.transformer_blocks.0.attn1.to_q.lora_B.weight": (64, 4)}, None),                # a tiny model
])
def test_inspect_recognizes_the_model_or_says_unknown(tmp_path, keys, family):
    save_file({k: torch.randn(shape) * 0.1 for k, shape in keys.items()}, str(tmp_path / "lora.safetensors"))
    info = cogft(["inspect", str(tmp_path / "lora.safetensors")])
    assert info["family"]["name"] == family, info["family"]
    if family is None:
        assert info["family"]["source"].startswith("unknown") and info["loaders"]["comfyui_native"]["loads"] is None
    elif family == "cogview4":  # never described as CogVideoX, nor as loading in native ComfyUI
        assert info["loaders"]["comfyui_native"]["loads"] is False
        with pytest.raises(SystemExit, match="native ComfyUI does not run this model"):
            cogft(["convert", str(tmp_path / "lora.safetensors"), str(tmp_path / "c.safetensors"), "--to", "comfy"])


def test_a_cogvlm_adapter_and_a_tiny_cogview4_lora_are_not_taken_for_cogvideox(tmp_path):
    from finetune.adapters import LoRA
    from test_cogview4 import tiny_family as tiny_cogview4

    save_file({"base_model.model.model.layers.0.self_attn.language_expert_query_key_value.lora_A.weight":
               torch.zeros(4, 64)}, str(tmp_path / "adapter_model.safetensors"))
    assert cogft(["inspect", str(tmp_path / "adapter_model.safetensors")])["family"]["name"] == "cogvlm"
    family = tiny_cogview4()
    adapter = LoRA(rank=4, alpha=4)
    adapter.apply(family.trainable_module(), family.lora_target_modules)
    export = family.export(tmp_path / "cogview4", adapter)
    info = cogft(["inspect", str(export)])
    assert info["family"]["name"] is None and info["loaders"]["comfyui_native"]["loads"] is None  # tiny: unknown
    assert info["loaders"]["diffusers"]["loads"] and info["loaders"]["diffusers"]["strength"] == 1.0
    with pytest.raises(SystemExit, match="which model .* is for is unknown"):
        cogft(["convert", str(export), str(tmp_path / "c.safetensors"), "--to", "comfy"])


def test_native_comfyui_claims_count_what_its_key_map_applies(trained, tiny_cogvideox):
    """ComfyUI's generic key map (comfy/lora.py), written out here: for every native module M of the model it takes
    `lora_unet_<M with _>` keys. The kit's kohya file (diffusers names) then loads partially, and inspect says how
    much: the keys, the modules and the share of the update that it applies."""
    _, _, files, deltas, _ = trained
    tensors, _ = read(files["kohya"])
    native_stems = {"lora_unet_" + reference_native(k.removesuffix(".weight")).replace(".", "_")
                    for k in base_weights(tiny_cogvideox) if k.endswith(".weight")}
    hit = [k for k in tensors if k.split(".")[0] in native_stems]
    modules = {k.split(".")[0] for k in hit}
    assert hit and len(hit) < len(tensors) and modules == {"lora_unet_time_embedding_linear_1"}
    claim = cogft(["inspect", str(files["kohya"])])["loaders"]["comfyui_native"]
    assert claim["loads"] and claim["partial"] and claim["keys"] == [len(hit), len(tensors)]
    assert claim["modules"] == [len(modules), len(deltas)]
    share = float(deltas["time_embedding.linear_1"].pow(2).sum()) / sum(float(d.pow(2).sum()) for d in deltas.values())
    assert claim["fraction"] == pytest.approx(share, rel=1e-4) and "PARTIAL" in claim["note"]
    whole = cogft(["inspect", str(files["comfy"])])["loaders"]["comfyui_native"]  # the comfy file: all of it
    assert whole["loads"] and not whole["partial"] and whole["fraction"] == pytest.approx(1.0)
