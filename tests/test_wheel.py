"""The kit installs as a wheel (`pip install .`, not only `-e`): the wheel carries every config, and from any directory
the installed `cogft` finds them (`cogft --help`, `cogft inspect`, `cogft train ... preset=tiny`)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", str(out), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=600)
    (path,) = out.glob("cog_finetune-*.whl")
    return path


def test_the_wheel_carries_every_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {p.relative_to(REPO).as_posix() for p in (REPO / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    assert {"conf/__init__.py", "finetune/cogft/__init__.py", "recipes/cogvideox/family.py",
            "datamodules/video.py"} <= names
    assert not any(n.startswith("tests/") for n in names)


def test_the_installed_package_trains_and_inspects_from_another_directory(wheel, tmp_path):
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    python = env_dir / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   capture_output=True, timeout=300)
    # torch and the other dependencies from this environment, after the venv's own packages: the kit comes from the
    # wheel (a path added by a .pth is searched after site-packages, and its own .pth files, this checkout's
    # editable install among them, are not read)
    site = subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   text=True).strip()
    Path(site, "zz_test_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(env_dir / "bin" / "cogft"), *args], cwd=elsewhere, env=env, capture_output=True,
                              text=True, timeout=600)

    where = subprocess.check_output([str(python), "-c", "import finetune, conf; print(finetune.__file__, conf.__file__)"],
                                    cwd=elsewhere, env=env, text=True)
    assert str(REPO) not in where and site in where, where
    assert run("--help").returncode == 0
    trained = run("train", "recipe=cogvideox_lora", "preset=tiny", "trainer.max_steps=2", "logger=csv",
                  "callbacks.samples=null", f"run_dir={elsewhere / 'run'}")
    assert trained.returncode == 0, trained.stderr[-3000:]
    export = elsewhere / "run" / "export" / "pytorch_lora_weights.safetensors"
    assert export.is_file()
    inspected = run("inspect", str(export))
    assert inspected.returncode == 0 and "diffusers" in inspected.stdout, inspected.stderr[-2000:]
    typo = run("train", "recipe=cogvideox_lora", "preset=tiny", "trainer.max_step=2")
    assert typo.returncode == 1 and "did you mean trainer.max_steps" in typo.stderr, typo.stderr[-2000:]
