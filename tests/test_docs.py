"""The kit's docs: the code cites only them (`docs/<page>.md#<section>`, each section existing), no machine's absolute
path is in the code, the README stays a quickstart, and every command of README.md and docs/*.md is run or composed
by a test (the `python train.py` lines by tests/test_readme.py, the others as named below)."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, compose
from test_readme import PAGES

# Spelt in two parts so that this file does not match itself.
RETIRED_CITATION = "REFER" + "ENCE"
ABSOLUTE_PATHS = re.compile("|".join(["/wo" + "rk/", "/ro" + "ot/", "/ho" + "me/"]))
CITATION = re.compile(r"docs/([\w.-]+\.md)(?:#([\w-]+))?")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")


def source_files() -> list[Path]:
    """The checkout's code and configs (tracked and untracked, not ignored: no virtualenv, no run outputs)."""
    try:
        listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.split()
        paths = [REPO / p for p in listed]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        skip = {".git", ".venv", "outputs", "wandb", "__pycache__"}
        paths = [p for p in REPO.rglob("*") if not skip & set(p.relative_to(REPO).parts)]
    return sorted(p for p in paths if p.suffix in (".py", ".yaml", ".yml") and p.is_file())


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lowercase, punctuation dropped (letters, digits, `_`, `-` kept), spaces -> `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading's anchor in a markdown page (fenced blocks skipped; a repeated heading gets -1, -2, ...)."""
    seen: dict[str, int] = {}
    found = set()
    in_fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
            continue
        match = None if in_fence else re.match(r"#{1,6} (.+)$", line)
        if match:
            base = slug(match.group(1))
            found.add(base if base not in seen else f"{base}-{seen[base]}")
            seen[base] = seen.get(base, 0) + 1
    return found


def test_slug_follows_githubs_rules():
    assert slug("The 1.5 I2V latent scale") == "the-15-i2v-latent-scale"
    assert slug("Loaders' rules") == "loaders-rules"
    assert slug("CogView4 and CogView3-Plus (text-to-image)") == "cogview4-and-cogview3-plus-text-to-image"
    assert slug("`cogft` and model_path") == "cogft-and-model_path"
    assert anchors("# A\n## A\n```\n# not a heading\n```\n") == {"a", "a-1"}


def test_no_retired_citation_in_code_or_config():
    hits = [f"{p.relative_to(REPO)}:{n}" for p in source_files()
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if RETIRED_CITATION in line]
    assert not hits, f"cite docs/<page>.md#<section> instead: {hits}"


def test_no_absolute_path_in_code_or_config():
    hits = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in source_files()
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if ABSOLUTE_PATHS.search(line)]
    assert not hits, hits


def test_every_docs_section_the_code_cites_exists():
    cited = {}
    for path in source_files():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in CITATION.finditer(line):
                before = line[:match.start()].split()
                if before and before[-1].startswith("--"):  # a file a command writes (`--markdown FILE`)
                    continue
                cited.setdefault((match.group(1), match.group(2) or ""), f"{path.relative_to(REPO)}:{n}")
    assert any(anchor for _, anchor in cited), "the code cites no docs section"
    missing = []
    for (page, anchor), where in sorted(cited.items()):
        doc = REPO / "docs" / page
        if not doc.is_file():
            missing.append(f"{where}: docs/{page} does not exist")
        elif anchor and anchor not in anchors(doc.read_text(encoding="utf-8")):
            missing.append(f"{where}: docs/{page} has no section #{anchor}")
    assert not missing, missing


def test_every_link_between_the_pages_resolves():
    broken = []
    for name, text in PAGES.items():
        base = (REPO / name).parent
        for target in MARKDOWN_LINK.findall(text):
            if re.match(r"\w+://", target):
                continue
            file, _, anchor = target.partition("#")
            path = (base / file) if file else REPO / name
            if not path.exists():
                broken.append(f"{name}: {target} (no {file})")
            elif anchor and (path.suffix != ".md" or anchor not in anchors(path.read_text(encoding="utf-8"))):
                broken.append(f"{name}: {target} (no section #{anchor})")
    assert not broken, broken


def test_readme_is_a_quickstart():
    lines = PAGES["README.md"].count("\n")
    assert lines <= 200, f"README.md has {lines} lines: move a topic into docs/"
    for page in PAGES:
        if page.startswith("docs/"):
            assert f"({page})" in PAGES["README.md"], f"README's documentation table does not list {page}"


def fenced_blocks(text: str) -> list[tuple[str, str, str]]:
    """(language, marker or "", body) of every fenced block."""
    return [(lang, marker or "", body) for marker, lang, body in
            re.findall(r"(?:<!-- ([\w-]+) -->\n)?^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def command_lines() -> list[tuple[str, str, str]]:
    """(page, marker, line) of every line of every bash block."""
    return [(page, marker, line.strip()) for page, text in PAGES.items()
            for lang, marker, body in fenced_blocks(text) if lang == "bash"
            for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


# Who runs each kind of command (a kind not listed here fails test_every_command_is_run_or_composed).
RUN_BY = {
    "python train.py ": "tests/test_readme.py (every line composed; preset=tiny ones trained)",
    "cogft ": "tests/cogft/test_cogft_commands.py::test_readme_cogft_section_runs (docs/cogft.md, in order)",
    "torchrun ": "tests/finetune/test_distributed.py::test_readme_torchrun_command (the torchrun block)",
    "python -m recipes.cogvlm.predict ": "tests/test_readme.py::test_predict_command_from_readme (the predict block)",
    "python bench/": "test_bench_commands_parse, here",
    "python -m datamodules.demo_videos ": "tests/test_readme.py::test_prepare_data_commands_go_from_raw_clips_to_a_lora",
    "srun python train.py ": "tests/finetune/test_interrupt.py::test_the_sbatch_example_composes (the sbatch block)",
}
# README's install and test commands: .ci/run runs them on a clean checkout.
CI_COMMANDS = {"python3 -m venv .venv && . .venv/bin/activate", "pip install torch==2.13.0", 'pip install -e ".[test]"',
               "python -m pytest -q"}
# Shell steps that set up a bench comparison (docs/benchmarks.md: the old kit's checkout), not the kit's commands.
SETUP = ("mkdir -p /tmp/before && git archive ", "cp bench/")


def strip_env(line: str) -> str:
    return re.sub(r"^(?:[A-Z_]+=\S+ )+", "", line)


def test_every_command_is_run_or_composed():
    lines = command_lines()
    assert len(lines) > 30
    unknown = []
    for page, marker, line in lines:
        command = strip_env(line.split("  #")[0].strip())
        if page == "README.md" and command in CI_COMMANDS or command.startswith(SETUP):
            continue
        kind = next((k for k in RUN_BY if command.startswith(k)), None)
        if kind is None:
            unknown.append(f"{page}: {line}")
        elif kind == "cogft ":
            assert page == "docs/cogft.md" or (page, marker) == ("README.md", "prepare"), \
                f"{page}: {line}: cogft commands are run from docs/cogft.md (or README's prepare block)"
        elif kind == "torchrun ":
            assert marker == "torchrun" and page == "docs/scaling.md", f"{page}: {line}"
        elif kind.startswith("python -m recipes.cogvlm.predict"):
            assert marker == "predict", f"{page}: {line}"
    assert not unknown, f"no test runs these (add one, and a RUN_BY entry): {unknown}"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[test]"' in ci and "python -m pytest -q" in ci


def test_python_blocks_are_the_ones_tests_execute():
    executed = {"load-lora", "load-cogvideox-exports", "merge", "load-control"}  # test_readme.py, test_cogvideox_i2v.py,
    # test_cogview4_control.py
    for page, text in PAGES.items():
        for lang, marker, _ in fenced_blocks(text):
            if lang == "python":
                assert marker in executed, f"{page}: a python block no test runs (marker {marker!r})"


def inline_commands(prefix: str) -> list[str]:
    return [strip_env(span) for text in PAGES.values() for span in re.findall(r"`([^`\n]+)`", text)
            if strip_env(span).startswith(prefix)]


def test_inline_train_commands_compose():
    """`python train.py ...` written inside a sentence or a table composes like the block commands."""
    commands = inline_commands("python train.py ")
    assert commands
    for command in commands:
        overrides = [a for a in shlex.split(command)[2:] if not a.startswith("--") and a != "job"]
        cfg = compose(overrides)
        assert cfg.model is not None, command


class Parsed(Exception):
    pass


def test_bench_commands_parse(monkeypatch):
    """Every `python bench/X.py ...` of the pages (blocks and inline) is accepted by that script's argument parser:
    its `main(argv)` stops right after parsing."""
    commands = [strip_env(line) for _, _, line in command_lines() if strip_env(line).startswith("python bench/")]
    commands = list(dict.fromkeys(commands + inline_commands("python bench/")))
    assert len(commands) >= 5
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)
        raise Parsed

    monkeypatch.syspath_prepend(str(REPO / "bench"))
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    for command in commands:
        args = shlex.split(command.split("  #")[0])
        module = importlib.import_module(Path(args[1]).stem)
        with pytest.raises(Parsed):
            module.main(args[2:])
