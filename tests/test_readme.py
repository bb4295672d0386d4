"""Every command in README.md and docs/*.md is run or composed here (or by .ci/run: install and the test command;
the cogft, torchrun and bench commands by the tests tests/test_docs.py names)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, compose

README = (REPO / "README.md").read_text(encoding="utf-8")
# The README first, then the docs pages in name order: every page whose commands and marked blocks are tested.
PAGES = {"README.md": README, **{f"docs/{p.name}": p.read_text(encoding="utf-8")
                                 for p in sorted((REPO / "docs").glob("*.md"))}}


def block_after(marker: str, page: str | None = None) -> str:
    """The fenced block after `<!-- marker -->`, in `page` (e.g. "docs/cogvlm.md") or in the one page that has it."""
    pages = [page] if page else list(PAGES)
    found = [m.group(1).strip() for name in pages
             for m in re.finditer(rf"<!-- {marker} -->\n```\w*\n(.*?)```", PAGES[name], re.S)]
    assert found, f"{page or 'README.md or docs/'} has no block marked {marker}"
    assert len(found) == 1, f"{len(found)} blocks marked {marker}: a marker names one block"
    return found[0]


def train_commands() -> list[str]:
    """Every `python train.py ...` line of README.md and docs/*.md, each once, in page order."""
    lines = [line.strip() for text in PAGES.values() for line in re.findall(r"^python train\.py .*$", text, re.M)]
    return list(dict.fromkeys(lines))


def run(command: str, env_extra: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    args = shlex.split(command)
    args[0] = sys.executable
    return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_train_command_composes():
    commands = train_commands()
    assert len(commands) >= 5
    for command in commands:
        overrides = [a for a in shlex.split(command)[2:] if not a.startswith("--") and a != "job"]
        cfg = compose(overrides)
        assert cfg.model is not None and cfg.data is not None, command


TINY_COMMANDS = [c for c in train_commands() if "preset=tiny" in c and "run_dir=" not in c
                 and "model.path=outputs/" not in c  # starts from another command's export: chained below
                 and "data.root=captioned" not in c  # the "Preparing data" block's: chained below
                 and c != "python train.py recipe=cogvideox_lora preset=tiny"]


@pytest.mark.slow
@pytest.mark.parametrize("command", TINY_COMMANDS)
def test_every_tiny_command_runs(command, tmp_path):
    """The README's other offline commands, in-process (CSV logging instead of W&B to keep it quick)."""
    from finetune.run import train

    overrides = shlex.split(command)[2:] + [f"run_dir={tmp_path}", "logger=csv"]
    train(compose(overrides))
    assert list((tmp_path / "export").iterdir())


@pytest.mark.slow
def test_cogvlm_demo_commands_chain(tmp_path):
    """The CogVLM demo's two commands as written, shortened: the LoRA run starts from the SFT run's export."""
    from finetune.run import train

    sft, lora = [c for c in train_commands() if "cogvlm_demo_sft" in c]
    assert "run_dir=outputs/cogvlm_demo_sft" in sft and "model.path=outputs/cogvlm_demo_sft/export" in lora
    short = ["logger=csv", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=1"]
    train(compose(shlex.split(sft.replace("outputs/cogvlm_demo_sft", str(tmp_path / "sft")))[2:] + short))
    assert (tmp_path / "sft" / "export" / "config.json").exists()
    lora = lora.replace("outputs/cogvlm_demo_sft", str(tmp_path / "sft"))
    train(compose(shlex.split(lora)[2:] + short + [f"run_dir={tmp_path / 'lora'}"]))
    assert (tmp_path / "lora" / "export" / "adapter_config.json").exists()


@pytest.mark.slow
def test_demo_command_trains_exports_and_writes_videos(tmp_path):
    """The README's main job, as a subprocess, W&B offline without credentials."""
    command = block_after("demo", "README.md")
    assert command == "python train.py recipe=cogvideox_lora preset=tiny"
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    result = subprocess.run(shlex.split(command.replace("python", sys.executable, 1)) + [f"run_dir={tmp_path}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "export" / "pytorch_lora_weights.safetensors").stat().st_size > 0
    videos = sorted((tmp_path / "samples").glob("step_*/00.mp4"))
    assert [v.parent.name for v in videos] == ["step_000020", "step_000040"]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists() and (tmp_path / "config.yaml").exists()
    offline = list((tmp_path / "wandb").glob("offline-run-*"))
    assert offline and list(offline[0].glob("files/media/videos/val/*.mp4"))
    assert "wandb sync" in result.stderr


@pytest.mark.slow
def test_resume_commands(tmp_path):
    resume = [c for c in train_commands() if "run_dir=outputs/my_run" in c]
    assert len(resume) == 2 and "ckpt_path=last" in resume[1]
    for command in resume:
        result = run(command.replace("outputs/my_run", str(tmp_path)) + " logger=csv")
        assert result.returncode == 0, result.stderr[-3000:]
    assert "Restoring states from the checkpoint" in result.stderr + result.stdout
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_print_config_command():
    command = next(c for c in train_commands() if "--cfg job" in c)
    result = run(command, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "path: THUDM/CogVideoX-2b" in result.stdout and "rank: 128" in result.stdout


def test_load_lora_snippet(tiny_cogvideox, tmp_path):
    import torch

    from finetune.adapters import LoRA
    from recipes.cogvideox.family import CogVideoX

    family = CogVideoX(path="tiny", dtype="fp32", height=32, width=32, num_frames=9, max_sequence_length=16)
    adapter = LoRA(rank=4, alpha=2)
    adapter.apply(family.transformer, family.lora_target_modules)
    family.export(tmp_path, adapter)
    snippet = block_after("load-lora")
    snippet = snippet.replace('"THUDM/CogVideoX-2b"', repr(tiny_cogvideox)).replace(
        '"outputs/cogvideox_lora/RUN/export"', repr(str(tmp_path))).replace("torch.float16", "torch.float32")
    scope: dict = {}
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(snippet, scope)
    assert not [str(w.message) for w in caught if "torch_dtype" in str(w.message)]  # the installed pins take dtype=
    assert scope["pipe"].transformer.peft_config["mine"].r == 4
    assert torch.is_tensor(scope["pipe"].transformer.proj_out.weight)


@pytest.fixture(scope="module")
def cogvlm_export(tiny_cogvlm, tmp_path_factory):
    """A tiny CogVLM with a non-trivial LoRA, exported as the recipe exports it."""

    from finetune.adapters import LoRA
    from recipes.cogvlm.family import CogVLM

    family = CogVLM(path=tiny_cogvlm, dtype="fp32")
    adapter = LoRA(rank=4, alpha=8, init_lora_weights="gaussian")
    adapter.apply(family.trainable_module(), family.lora_target_modules)
    out = tmp_path_factory.mktemp("cogvlm_export")
    family.export(out, adapter)
    return out


def test_predict_command_from_readme(tiny_cogvlm, cogvlm_export, tmp_path):
    from datamodules.captcha_sources import CaptchaGenerator

    generator = CaptchaGenerator(count=3, length=2, charset="0123456789", width=60, height=60)
    for index, name in enumerate(["img1.png", "img2.jpg"]):
        generator.image(index).convert("RGB").save(tmp_path / name)
    command = block_after("predict").replace("THUDM/cogvlm-base-490-hf", tiny_cogvlm).replace(
        "outputs/cogvlm_captcha_lora/RUN/export", str(cogvlm_export))
    command = command.replace("img1.png", str(tmp_path / "img1.png")).replace("img2.jpg", str(tmp_path / "img2.jpg"))
    result = run(command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(tmp_path / "img1.png"), str(tmp_path / "img2.jpg")]


def test_merge_snippet_from_readme(tiny_cogvlm, cogvlm_export, tmp_path, monkeypatch):
    from safetensors import safe_open

    monkeypatch.chdir(tmp_path)
    snippet = block_after("merge").replace('"THUDM/cogvlm-base-490-hf"', repr(tiny_cogvlm)).replace(
        '"outputs/cogvlm_captcha_lora/RUN/export"', repr(str(cogvlm_export))).replace("torch.bfloat16", "torch.float32")
    exec(snippet, {})
    keys = set()
    for shard in (tmp_path / "merged").glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            keys |= set(f.keys())
    base = set()
    for shard in Path(tiny_cogvlm).glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            base |= set(f.keys())
    assert keys == base  # the merged model has exactly the base checkpoint's key names


@pytest.mark.slow
def test_prepare_data_commands_go_from_raw_clips_to_a_lora(tmp_path, monkeypatch, capsys):
    """README "Preparing data": raw clips, `cogft caption`, `cogft data` with a contact sheet, train.py on the
    captioned folder, in order and in one working directory as a user types them (training shortened)."""
    from datamodules.demo_videos import main as write_clips
    from finetune.cogft import run as cogft
    from finetune.run import train

    lines = block_after("prepare", "README.md").splitlines()
    assert [line.split()[:3] for line in lines] == [["python", "-m", "datamodules.demo_videos"],
                                                    ["cogft", "caption", "raw_clips"],
                                                    ["cogft", "data", "captioned"],
                                                    ["python", "train.py", "recipe=cogvideox_lora"]]
    monkeypatch.chdir(tmp_path)
    write_clips(shlex.split(lines[0])[3:])
    assert len(list((tmp_path / "raw_clips").glob("*.mp4"))) == 8
    assert not list((tmp_path / "raw_clips").glob("*.txt"))  # no captions: raw footage
    summary = cogft(shlex.split(lines[1])[1:] + ["--no-progress"])
    assert summary["files"] == summary["captioned"] == 8
    captioned = (tmp_path / "captioned" / "videos.txt").read_text().split()
    assert captioned and len(captioned) == 8 - len(summary["empty"])
    capsys.readouterr()
    cogft(shlex.split(lines[2])[1:])
    report = capsys.readouterr().out
    assert f"data: {len(captioned)} samples ({len(captioned)} videos)" in report, report
    assert (tmp_path / "sheet.png").stat().st_size > 0
    run_dir = tmp_path / "run"
    train(compose(shlex.split(lines[3])[2:] + [f"run_dir={run_dir}", "logger=csv", "trainer.max_steps=4",
                                               "callbacks.samples.every_n_steps=0"]))
    assert (run_dir / "export" / "pytorch_lora_weights.safetensors").stat().st_size > 0
