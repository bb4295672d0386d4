"""`cogft export / merge / generate / push` on the tiny presets, and the cogft section of docs/cogft.md as written."""

from __future__ import annotations

import json
import re
import shlex

import av
import numpy as np
import pytest
import torch
from conftest import REPO, compose, perturb_trainable
from omegaconf import OmegaConf
from PIL import Image
from test_cogvideox_export import transformer_inputs

from finetune.checkpointing import run_identity
from finetune.media import write_video
from finetune.run import build_module
from finetune.cogft import run as cogft


def fake_run(recipe: str, run_dir, seed: int = 0):
    """A run directory as train.py leaves it (config.yaml, checkpoints/last.ckpt) with trained-looking weights."""
    cfg = compose([f"recipe={recipe}", "preset=tiny", f"run_dir={run_dir}"])
    torch.manual_seed(seed)
    module = build_module(cfg)
    perturb_trainable(module, seed=seed)
    (run_dir / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": module.trainable_state_dict(), "cogft": run_identity(cfg)},
               run_dir / "checkpoints" / "last.ckpt")
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return module


@pytest.fixture(scope="module")
def t2v_run(tiny_cogvideox, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    module = fake_run("cogvideox_lora", run_dir)
    written = cogft(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--formats", "comfy"])
    return module, run_dir, written


def test_export_from_a_checkpoint_loads_in_diffusers(t2v_run, tiny_cogvideox):
    from diffusers import CogVideoXPipeline

    module, run_dir, written = t2v_run
    assert [p.name for p in written] == ["pytorch_lora_weights.safetensors", "comfyui_lora.safetensors"]
    assert all(p.parent == run_dir / "export" for p in written)
    family = module.family.eval()
    inputs = transformer_inputs(family)
    pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(run_dir / "export")
        torch.testing.assert_close(pipe.transformer(**inputs)[0], family.transformer(**inputs)[0])
    assert (base - family.transformer(**inputs)[0]).abs().max() > 1e-3


def test_export_of_a_full_finetune_is_the_full_network(tiny_cogvideox, tmp_path):
    from diffusers import CogVideoXTransformer3DModel

    module = fake_run("cogvideox_sft", tmp_path)
    written = cogft(["export", str(tmp_path / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "out")])
    assert written == [tmp_path / "out" / "transformer"]
    family = module.family.eval()
    inputs = transformer_inputs(family)
    with torch.no_grad():
        torch.testing.assert_close(CogVideoXTransformer3DModel.from_pretrained(written[0])(**inputs)[0],
                                   family.transformer(**inputs)[0])


def test_export_refuses_a_checkpoint_of_another_config(t2v_run, tmp_path):
    _, run_dir, _ = t2v_run
    cfg = OmegaConf.load(run_dir / "config.yaml")
    cfg.adapter.rank = 2
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(SystemExit, match="trained for another config"):
        cogft(["export", str(run_dir / "checkpoints" / "last.ckpt"), "--config", str(tmp_path / "config.yaml"),
               "--out", str(tmp_path / "x")])


def test_cogvlm_export_loads_with_peft(tiny_cogvlm, tmp_path):
    from peft import PeftModel

    from recipes.cogvlm import CogVLMForCausalLM

    module = fake_run("cogvlm_captcha_lora", tmp_path)
    written = cogft(["export", str(tmp_path / "checkpoints" / "last.ckpt")])
    assert (written[0] / "adapter_config.json").is_file()
    info = cogft(["inspect", str(written[0]), "--family", "cogvlm"])
    config = OmegaConf.load(tmp_path / "config.yaml").adapter
    assert info["layout"] == "peft" and info["full_tensors"] > 0  # the fully trained modules travel with it
    assert info["loaders"]["peft"]["scale"] == config.alpha / config.rank == info["trained_scale"]
    assert not info["loaders"]["diffusers"]["loads"] and not info["loaders"]["comfyui_native"]["loads"]
    record = info["model_record"]  # kept in the PEFT file's safetensors header, which PEFT does not read
    assert (record["family"], record["recipe"], record["base"]["path"]) == ("CogVLM", "cogvlm_captcha_lora", "tiny")
    assert (record["adapter"]["rank"], record["adapter"]["alpha"]) == (config.rank, config.alpha)
    family = module.family.eval()
    batch = family.processor.prompt_batch([Image.new("RGB", (28, 28), (200, 30, 30))])
    base = CogVLMForCausalLM.from_pretrained(family.local_path, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, str(written[0])).eval()
    with torch.no_grad():
        expected = family.model(**batch).logits
        torch.testing.assert_close(loaded(**batch).logits, expected)


def test_cogvlm_merge_and_captcha_reading(tiny_cogvlm, tmp_path, capsys):
    """CogVLM: `merge` fuses the PEFT adapter (outputs equal PEFT's), refuses a merged model, and `generate` reads
    captchas with the base + adapter as with the merged model."""
    from peft import PeftModel

    from recipes.cogvlm import CogVLMForCausalLM

    module = fake_run("cogvlm_captcha_lora", tmp_path / "run", seed=1)
    export = cogft(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt")])[0]
    merged = cogft(["merge", "--recipe", "cogvlm_captcha_lora", "--preset", "tiny", "--lora", str(export),
                    "--out", str(tmp_path / "merged")])
    family = module.family.eval()
    batch = family.processor.prompt_batch([Image.new("RGB", (28, 28), (20, 200, 30))])
    peft_model = PeftModel.from_pretrained(CogVLMForCausalLM.from_pretrained(family.local_path, dtype=torch.float32),
                                           str(export)).eval()
    with torch.no_grad():
        torch.testing.assert_close(CogVLMForCausalLM.from_pretrained(merged).eval()(**batch).logits,
                                   peft_model(**batch).logits, rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit, match="already a merged model"):
        cogft(["merge", "--recipe", "cogvlm_captcha_lora", "--preset", "tiny", "--model", str(merged),
               "--lora", str(export), "--out", str(tmp_path / "twice")])
    Image.new("RGB", (60, 60), (255, 255, 255)).save(tmp_path / "a.png")
    with_adapter = cogft(["generate", "--recipe", "cogvlm_captcha_lora", "--preset", "tiny", "--lora", str(export),
                          "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "read")])
    from_merged = cogft(["generate", "--recipe", "cogvlm_captcha_lora", "--preset", "tiny", "--model", str(merged),
                         "--image", str(tmp_path / "a.png"), "--out", str(tmp_path / "read_merged")])
    rows = with_adapter[0].read_text().splitlines()
    assert len(rows) == 1 and rows[0].startswith(f"{tmp_path / 'a.png'}\t")
    assert rows == from_merged[0].read_text().splitlines()


def test_merge_equals_base_plus_adapter_and_refuses_a_second_merge(t2v_run, tiny_cogvideox, tmp_path):
    from diffusers import CogVideoXPipeline

    module, run_dir, _ = t2v_run
    inputs = transformer_inputs(module.family)
    merged = cogft(["merge", "--recipe", "cogvideox_lora", "--preset", "tiny", "--lora", f"{run_dir / 'export'}:0.5",
                    "--out", str(tmp_path / "merged")])
    reference = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    reference.load_lora_weights(run_dir / "export", adapter_name="lora")
    reference.set_adapters(["lora"], [0.5])
    with torch.no_grad():
        expected = reference.transformer(**inputs)[0]
        got = CogVideoXPipeline.from_pretrained(merged).transformer(**inputs)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(SystemExit, match="already a merged model"):
        cogft(["merge", "--recipe", "cogvideox_lora", "--preset", "tiny", "--model", str(merged),
               "--lora", str(run_dir / "export"), "--out", str(tmp_path / "twice")])


def video_shape(path) -> tuple[int, int, int]:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), frames[0].shape[0], frames[0].shape[1]


@pytest.mark.parametrize("recipe, args, expected", [
    ("cogvideox_lora", ["--frames", "17", "--height", "32", "--width", "48"], (17, 32, 48)),
    ("cogvideox_i2v_lora", ["--image", "validation_image.png"], (9, 32, 32)),
    ("cogview4_lora", ["--height", "32", "--width", "64"], (32, 64)),
])
def test_generate_writes_the_requested_size(t2v_run, recipe, args, expected, tmp_path, capsys):
    _, run_dir, _ = t2v_run
    loras = ["--lora", f"{run_dir / 'export' / 'comfyui_lora.safetensors'}:0.8"] if recipe == "cogvideox_lora" else []
    paths = cogft(["generate", "--recipe", recipe, "--preset", "tiny", "--prompt", "a red circle", "--steps", "2",
                   "--out", str(tmp_path), *loras, *args])
    assert str(paths[0]) in capsys.readouterr().out
    if len(expected) == 3:
        assert paths[0].suffix == ".mp4" and video_shape(paths[0]) == expected
    else:
        assert paths[0].suffix == ".png" and np.asarray(Image.open(paths[0])).shape[:2] == expected


def test_push_dry_run_writes_what_would_be_uploaded(t2v_run, tmp_path):
    _, run_dir, _ = t2v_run
    write_video(run_dir / "samples" / "step_000040" / "00.mp4", np.zeros((9, 32, 32, 3), dtype=np.uint8))
    written = cogft(["push", str(run_dir / "export"), "--repo", "me/tiny-lora", "--dry-run", str(tmp_path / "up")])
    names = sorted(str(p.relative_to(tmp_path / "up")) for p in (tmp_path / "up").rglob("*") if p.is_file())
    assert names == sorted(str(p.relative_to(tmp_path / "up")) for p in written) == [
        "README.md", "comfyui_lora.safetensors", "pytorch_lora_weights.safetensors", "samples/00.mp4",
        "training_config.yaml"]
    card = (tmp_path / "up" / "README.md").read_text()
    adapter = OmegaConf.load(run_dir / "config.yaml").adapter
    for text in ("recipe `cogvideox_lora`", "CogVideoXPipeline.from_pretrained", 'load_lora_weights("me/tiny-lora"',
                 "LoraLoaderModelOnly", "samples/00.mp4", f"rank {adapter.rank}, alpha {adapter.alpha}",
                 "training_config.yaml"):
        assert text in card, text
    assert OmegaConf.load(tmp_path / "up" / "training_config.yaml").name == "cogvideox_lora"


def readme_section() -> str:
    readme = (REPO / "docs" / "cogft.md").read_text(encoding="utf-8")
    match = re.search(r"^## The cogft command\n(.*?)^## ", readme, re.S | re.M)
    assert match, "docs/cogft.md has no '## The cogft command' section"
    return match.group(1)


def test_readme_cogft_section_runs(tmp_path, monkeypatch, capsys):
    """Every command of the section, in order, in a scratch folder (training shortened to 4 steps, CSV logging)."""
    from finetune.run import train

    blocks = re.findall(r"```bash\n(.*?)```", readme_section(), re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines() if line.strip()]
    assert sum(c.startswith("cogft ") for c in commands) >= 6 and commands[0].startswith("python train.py")
    for sub in ("data", "inspect", "export", "convert", "merge", "generate", "push", "runs", "caption", "--help"):
        assert any(c.startswith("cogft") and sub in c for c in commands), sub
    monkeypatch.chdir(tmp_path)
    for command in commands:
        args = shlex.split(command)
        if args[0] == "python":
            train(compose(args[2:] + ["trainer.max_steps=4", "callbacks.samples.every_n_steps=0", "logger=csv"]))
            continue
        assert args[0] == "cogft", command
        if "--help" in args:
            with pytest.raises(SystemExit) as exit_code:
                cogft(args[1:])
            assert exit_code.value.code == 0
            continue
        cogft(args[1:])
    demo = tmp_path / "outputs" / "cogft_demo"
    assert (demo / "export" / "comfyui_lora.safetensors").is_file()  # callbacks.export.formats at training time
    assert (demo / "merged" / "cogft_merge.json").is_file() and (demo / "upload" / "README.md").is_file()
    assert (demo / "captioned" / "videos.txt").read_text() == "00.mp4\n"  # cogft caption --preset tiny
    with Image.open(demo / "data_sheet.png") as sheet:  # cogft data --sheet: a tile per demo clip
        assert len(json.loads(sheet.text["cogft:tiles"])) == 8
    assert video_shape(demo / "generated_17" / "00.mp4") == (17, 32, 48)
    out = capsys.readouterr().out
    assert "ComfyUI (native)" in out
    assert re.search(r"  finished +4/4  outputs/cogft_demo\n    export: outputs/cogft_demo/export\n", out)  # cogft runs


def test_export_formats_the_family_cannot_write_stop_before_training():
    from types import SimpleNamespace

    from finetune.adapters import Full, LoRA
    from finetune.callbacks import ExportAdapter
    from recipes.cogview.cogview4 import CogView4
    from recipes.cogvideox.family import CogVideoX

    def module(family, adapter):
        return SimpleNamespace(family=SimpleNamespace(export_formats=family.export_formats), adapter=adapter)

    ExportAdapter(formats=["diffusers", "comfy"]).setup(None, module(CogVideoX, LoRA()), "fit")
    with pytest.raises(ValueError, match="remove comfy"):
        ExportAdapter(formats=["diffusers", "comfy"]).setup(None, module(CogView4, LoRA()), "fit")
    with pytest.raises(ValueError, match="remove kohya"):
        ExportAdapter(formats=["kohya"]).setup(None, module(CogVideoX, Full()), "fit")


def test_console_script_exits_zero(t2v_run):
    """The entry point pyproject installs, run as a process: status 0 and the report on stdout."""
    import subprocess
    import sys
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cogft"] == "finetune.cogft:main"
    _, run_dir, _ = t2v_run
    result = subprocess.run([sys.executable, "-m", "finetune.cogft", "inspect", str(run_dir / "export")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "diffusers load_lora_weights" in result.stdout and "{'file'" not in result.stdout + result.stderr
    from finetune.cogft import main

    with pytest.raises(SystemExit) as missing:  # a message and status 1, no traceback
        main(["inspect", str(run_dir / "nothing")])
    assert isinstance(missing.value.code, str) and "no such file or folder" in missing.value.code


def test_cogvlm_merge_scale_and_the_fully_trained_modules(tiny_cogvlm, tmp_path):
    """`--lora EXPORT:0.5` halves the LoRA update; the fully trained ViT MLPs (`modules_to_save`) come as trained,
    or at half their change with `--blend-full-modules` (W_base + 0.5 * (W_trained - W_base))."""
    import json

    from safetensors.torch import load_file

    module = fake_run("cogvlm_captcha_lora", tmp_path / "run", seed=3)
    export = cogft(["export", str(tmp_path / "run" / "checkpoints" / "last.ckpt")])[0]
    saved = json.loads((export / "adapter_config.json").read_text())["modules_to_save"]
    assert saved

    def merged(name: str, *extra: str) -> dict:
        out = cogft(["merge", "--recipe", "cogvlm_captcha_lora", "--preset", "tiny", "--lora", f"{export}{name}",
                     "--out", str(tmp_path / f"merged{len(extra)}{name.strip(':')}"), *extra])
        return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

    from recipes.cogvlm import CogVLMForCausalLM

    base = CogVLMForCausalLM.from_pretrained(module.family.local_path, dtype=torch.float32).state_dict()
    whole, half, blended = merged(":1.0"), merged(":0.5"), merged(":0.5", "--blend-full-modules")
    record = json.loads((tmp_path / "merged10.5" / "cogft_merge.json").read_text())["loras"][0]
    assert record["full_modules"] == "blended at scale 0.5" and record["modules_to_save"] == saved
    full = [k for k in base if any(f".{entry}." in f".{k}" for entry in saved)]
    lora = [k for k in base if k not in full and not torch.equal(whole[k], base[k])]
    assert full and lora
    for key in full:
        assert not torch.equal(whole[key], base[key])
        assert torch.equal(half[key], whole[key]), key  # as trained, whatever the scale
        torch.testing.assert_close(blended[key], base[key] + 0.5 * (whole[key] - base[key]), rtol=0, atol=1e-6)
    for key in lora:  # the LoRA update at half strength under both options
        torch.testing.assert_close(half[key], base[key] + 0.5 * (whole[key] - base[key]), rtol=1e-5, atol=1e-6)
        assert torch.equal(half[key], blended[key])
