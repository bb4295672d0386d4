"""Exports that know their model: the `cogft_model` record every LoRA file of a run keeps (base model, family,
variant, recipe, step, adapter, kit version), `cogft inspect` showing it, and `cogft generate` / `cogft merge` /
`adapter_path=` refusing a LoRA of another model (docs/lora-formats.md#the-model-record, docs/cogft.md)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import compose
from safetensors import safe_open
from safetensors.torch import save_file
from test_cogview4 import tiny_family as tiny_cogview4_family

from finetune.adapters import LoRA
from finetune.checkpointing import kit_version
from finetune.cogft import run as cogft
from finetune.lora_formats.record import LoraMismatch, base_identity
from finetune.run import build, train

FILES = ("pytorch_lora_weights.safetensors", "comfyui_lora.safetensors", "kohya_lora.safetensors")


def read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def configs_sha256(folder) -> str:
    """sha256 over the checkpoint's config JSONs (model_index.json, */config.json, ...), sorted by relative path:
    written out here independently of the kit."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in sorted((p for p in root.rglob("*.json") if p.name == "model_index.json" or "config" in p.name),
                       key=lambda p: p.relative_to(root).as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


@pytest.fixture(scope="module")
def run_dir(tiny_cogvideox, tmp_path_factory):
    """A tiny CogVideoX LoRA run of 3 steps, exported in all three formats."""
    run_dir = tmp_path_factory.mktemp("recorded")
    train(compose(["recipe=cogvideox_lora", "preset=tiny", "logger=none", f"run_dir={run_dir}", "data.demo_count=4",
                   "callbacks.samples=null", "trainer.max_steps=3", "callbacks.export.formats=[diffusers,comfy,kohya]"]))
    return run_dir


@pytest.fixture(scope="module")
def cogview4_lora(tmp_path_factory):
    """A tiny CogView4 LoRA as its export writes it (record: family CogView4)."""
    family = tiny_cogview4_family()
    adapter = LoRA(rank=4, alpha=4)
    adapter.apply(family.trainable_module(), family.lora_target_modules)
    return family.export(tmp_path_factory.mktemp("cogview4"), adapter)


def test_every_export_file_records_the_base_model_and_the_run(run_dir, tiny_cogvideox):
    cfg = compose(["recipe=cogvideox_lora", "preset=tiny"])
    for name in FILES:
        _, header = read(run_dir / "export" / name)
        record = json.loads(header["cogft_model"])
        assert record == {"family": "CogVideoX", "variant": "T2V 1.0",
                          "base": {"path": "tiny", "config_sha256": configs_sha256(tiny_cogvideox)},
                          "recipe": "cogvideox_lora", "global_step": 3, "kit_version": kit_version(),
                          "adapter": record["adapter"]}, name
        assert record["adapter"]["type"] == "LoRA"
        assert (record["adapter"]["rank"], record["adapter"]["alpha"]) == (cfg.adapter.rank, cfg.adapter.alpha)
    assert "cogft_trained" in read(run_dir / "export" / FILES[0])[1]  # beside the old record, not instead of it


def test_the_diffusers_file_still_loads_in_diffusers(run_dir, tiny_cogvideox):
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_cogvideox)
    pipe.load_lora_weights(run_dir / "export")  # the extra header key does not disturb the loader
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_a_hub_base_records_its_id_and_snapshot_revision(tmp_path):
    snapshot = tmp_path / "hub" / "models--THUDM--CogVideoX-2b" / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    assert base_identity("THUDM/CogVideoX-2b", snapshot) == {"hub_id": "THUDM/CogVideoX-2b", "revision": "ab" * 20}
    assert base_identity("THUDM/CogVideoX-2b", tmp_path) == {"hub_id": "THUDM/CogVideoX-2b", "revision": None}
    (tmp_path / "config.json").write_text("{}")
    local = base_identity(str(tmp_path), tmp_path)
    assert local == {"path": str(tmp_path), "config_sha256": configs_sha256(tmp_path)}
    (tmp_path / "config.json").write_text('{"num_layers": 2}')  # other configs: another base
    assert base_identity(str(tmp_path), tmp_path)["config_sha256"] != local["config_sha256"]


def test_inspect_shows_the_record_and_notes_a_file_without_one(run_dir, tmp_path, capsys):
    cogft(["inspect", str(run_dir / "export")])
    report = capsys.readouterr().out
    assert "family      CogVideoX (T2V 1.0)" in report
    assert "recipe      cogvideox_lora   global step 3" in report
    assert "base model  tiny configs sha256 " in report and f"cog-finetune {kit_version()}" in report
    tensors, header = read(run_dir / "export" / FILES[0])
    del header["cogft_model"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    info = cogft(["inspect", str(tmp_path / "old.safetensors")])
    assert info["model_record"] is None and info["layout"] == "diffusers"  # the rest of the report as before
    assert "record      none: no cogft_model in the header" in capsys.readouterr().out


def generate_args(lora, out, *extra):
    return ["generate", "--recipe", "cogvideox_lora", "--preset", "tiny", "--prompt", "a red circle", "--steps", "1",
            "--frames", "9", "--height", "32", "--width", "32", "--lora", str(lora), "--out", str(out), *extra]


def merge_args(lora, out, *extra):
    return ["merge", "--recipe", "cogvideox_lora", "--preset", "tiny", "--lora", str(lora), "--out", str(out), *extra]


BOTH = r"a LoRA for CogView4 on tiny .*this model is CogVideoX \(T2V 1\.0\) on tiny"


def test_a_cogview4_lora_is_refused_by_generate_and_merge_on_cogvideox(cogview4_lora, tmp_path):
    with pytest.raises(SystemExit, match=f"error: cogft generate: .*{BOTH}.*--force"):
        cogft(generate_args(cogview4_lora, tmp_path / "gen"))
    with pytest.raises(SystemExit, match=f"error: cogft merge: .*{BOTH}.*--force"):
        cogft(merge_args(cogview4_lora, tmp_path / "merged"))
    assert not (tmp_path / "gen").exists() and not (tmp_path / "merged").exists()


def test_force_applies_it_when_the_shapes_fit_and_never_when_they_do_not(cogview4_lora, tmp_path, capsys):
    # the tiny CogView4 and CogVideoX share module names and sizes: forced, the LoRA applies (with a note)
    assert cogft(merge_args(cogview4_lora, tmp_path / "merged", "--force")).is_dir()
    assert "applied anyway (--force)" in capsys.readouterr().err
    # the real models do not (hidden size 4096 vs 1920/3072): the shapes refuse it, --force or not
    tensors, header = read(cogview4_lora)
    wide = {k: torch.zeros(v.shape[0], 2 * v.shape[1]) if ".lora_A." in k else v for k, v in tensors.items()}
    save_file(wide, str(tmp_path / "wide.safetensors"), metadata=header)
    with pytest.raises(SystemExit, match=r"LoRA modules do not fit this model, CogVideoX .*LoRA \d+x\d+, model "
                                         r"\d+x\d+.*trained for CogView4 .*not even with --force"):
        cogft(generate_args(tmp_path / "wide.safetensors", tmp_path / "gen", "--force"))


def test_adapter_path_refuses_it_unless_adapter_force(cogview4_lora, tmp_path, capsys):
    overrides = ["recipe=cogvideox_lora", "preset=tiny", "logger=none", f"run_dir={tmp_path / 'run'}",
                 "data.demo_count=4", "callbacks.samples=null", "adapter.rank=4", "adapter.alpha=4",
                 f"adapter_path={cogview4_lora.parent}"]
    with pytest.raises(LoraMismatch, match=f"{BOTH}.*adapter_force=true"):
        build(compose(overrides))
    # forced: the tiny models' modules fit, so it loads into the recipe's adapter (same rank, alpha and targets)
    trainer, module, _, _ = build(compose([*overrides, "adapter_force=true"]))
    expected, _ = read(cogview4_lora)
    loaded = {k.replace(".default", ""): v for k, v in module.family.transformer.state_dict().items() if "lora_" in k}
    assert loaded and all(torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in expected.items()
                          if ".lora_A." in k)
    assert "applied anyway (adapter_force=true)" in capsys.readouterr().err


def test_a_file_without_the_record_is_applied_with_a_note(run_dir, tmp_path, capsys):
    tensors, header = read(run_dir / "export" / FILES[0])
    del header["cogft_model"]
    save_file(tensors, str(tmp_path / "old.safetensors"), metadata=header)
    paths = cogft(generate_args(tmp_path / "old.safetensors", tmp_path / "gen"))
    assert paths and paths[0].is_file()
    err = capsys.readouterr().err
    assert "has no cogft_model record" in err and "shapes were checked" in err


def test_the_config_checker_takes_adapter_force_as_a_bool():
    from finetune.settings.check import config_problems

    assert compose(["recipe=cogvideox_lora", "preset=tiny"]).adapter_force is False  # conf/train.yaml's default
    assert config_problems(compose(["recipe=cogvideox_lora", "preset=tiny", "adapter_force=true"])) == []
    problems = config_problems(compose(["recipe=cogvideox_lora", "preset=tiny", "adapter_force=maybe"]))
    assert any("adapter_force" in p for p in problems), problems
