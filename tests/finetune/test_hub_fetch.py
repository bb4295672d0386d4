"""A hub id's configs come first, its weights only after every check passed (finetune/hub.py, finetune/run.py
`build`), into the same snapshot folder. The hub is a local "remote" folder (the tiny CogVideoX checkpoint) served by
a fake `snapshot_download` that filters with huggingface_hub's own pattern rules and records every file it fetches."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from conftest import compose
from huggingface_hub.utils import filter_repo_objects

import finetune.run
from datamodules.video import VideoDataModule
from finetune.data import DataError
from finetune.errors import ModelPathError
from finetune.hub import CHECK_FILES, NOT_CHECK_FILES
from finetune.run import build, train

REPO_ID = "fake-org/tiny-cogvideox"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
WEIGHTS = (".safetensors", ".bin", ".pt")


def is_weight(name: str) -> bool:
    return name.endswith(WEIGHTS)


class FakeHub:
    """`snapshot_download` for one repository: the files of `remote` that pass `allow_patterns`/`ignore_patterns`,
    copied into a snapshot folder named by the commit as huggingface_hub's cache is; files already there are not
    fetched again. `events` records ("fetched", name) for each file, in order; tests add their own events."""

    def __init__(self, remote: Path, cache: Path, fail_on_revision: Exception | None = None):
        self.remote, self.fail_on_revision = remote, fail_on_revision
        self.snapshot = cache / "models--fake-org--tiny-cogvideox" / "snapshots" / COMMIT
        self.events: list[tuple[str, str]] = []
        self.calls: list[dict] = []

    def snapshot_download(self, repo_id, *, revision=None, allow_patterns=None, ignore_patterns=None, **unexpected):
        assert repo_id == REPO_ID and not unexpected, (repo_id, unexpected)
        assert revision in (None, COMMIT), revision  # the weights come from the commit the configs came from
        self.calls.append({"revision": revision, "allow_patterns": allow_patterns, "ignore_patterns": ignore_patterns})
        if revision is not None and self.fail_on_revision is not None:
            raise self.fail_on_revision
        names = sorted(p.relative_to(self.remote).as_posix() for p in self.remote.rglob("*") if p.is_file())
        for name in filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns):
            target = self.snapshot / name
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(self.remote / name, target)
                self.events.append(("fetched", name))
        return str(self.snapshot)

    def fetched(self) -> list[str]:
        return [name for kind, name in self.events if kind == "fetched"]

    def remote_files(self) -> set[str]:
        return {p.relative_to(self.remote).as_posix() for p in self.remote.rglob("*") if p.is_file()}


@pytest.fixture
def fake_hub(tiny_cogvideox, tmp_path, monkeypatch):
    remote = tmp_path / "remote"
    shutil.copytree(tiny_cogvideox, remote)
    (remote / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")  # code: never fetched first
    (remote / "README.md").write_text("# tiny\n")
    hub = FakeHub(remote, tmp_path / "hf-cache")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub.snapshot_download)
    return hub


def record(monkeypatch, hub: FakeHub, owner, name: str, event: str) -> None:
    """`owner.name` records `event` once it returned (a check that passed)."""
    real = getattr(owner, name)

    def recorded(*args, **kwargs):
        result = real(*args, **kwargs)
        hub.events.append((event, ""))
        return result

    monkeypatch.setattr(owner, name, recorded)


def hub_cfg(run_dir: Path, *extra: str, path: str = REPO_ID):
    return compose(["recipe=cogvideox_lora", "preset=tiny", "logger=csv", f"run_dir={run_dir}",
                    f"model.path={path}", "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false",
                    "data.demo_count=2", *extra])


def test_the_first_fetch_holds_configs_tokenizers_and_index_files_only():
    """The patterns by huggingface_hub's own rules, on the files of real Cog repositories (CogView4-6B, CogVLM)."""
    listing = ["model_index.json", "README.md", "scheduler/scheduler_config.json", "text_encoder/config.json",
               "text_encoder/model-00001-of-00004.safetensors", "text_encoder/model.safetensors.index.json",
               "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json",
               "transformer/config.json", "transformer/diffusion_pytorch_model-00001-of-00003.safetensors",
               "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json",
               "vae/diffusion_pytorch_model.safetensors", "config.json", "generation_config.json",
               "modeling_cogvlm.py", "visual.py", "pytorch_model-00001-of-00008.bin", "pytorch_model.bin.index.json",
               "tokenizer.model", "tokenizer.tiktoken", "merges.txt", "spiece.model", "model.pt", "vae/model.ckpt"]
    first = set(filter_repo_objects(listing, allow_patterns=list(CHECK_FILES), ignore_patterns=list(NOT_CHECK_FILES)))
    assert first == {"model_index.json", "scheduler/scheduler_config.json", "text_encoder/config.json",
                     "text_encoder/model.safetensors.index.json", "tokenizer/tokenizer.json",
                     "tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json", "transformer/config.json",
                     "transformer/diffusion_pytorch_model.safetensors.index.json", "vae/config.json", "config.json",
                     "generation_config.json", "pytorch_model.bin.index.json", "tokenizer.model",
                     "tokenizer.tiktoken", "merges.txt", "spiece.model"}


def test_a_data_error_stops_the_run_before_any_weight_is_fetched(fake_hub, tmp_path, monkeypatch):
    loaded = []
    monkeypatch.setattr(finetune.run, "build_module", lambda *a, **k: loaded.append(a))
    missing = tmp_path / "no-such-videos"
    with pytest.raises(DataError, match="no-such-videos"):
        build(hub_cfg(tmp_path / "run", f"data.root={missing}"))
    fetched = fake_hub.fetched()
    assert "transformer/config.json" in fetched and "model_index.json" in fetched  # the checks' inputs came
    assert not [name for name in fetched if is_weight(name) or name.endswith(".py")] and not loaded
    assert len(fake_hub.calls) == 1 and fake_hub.calls[0]["allow_patterns"]  # one fetch, patterns given


def test_configs_then_checks_then_weights_into_the_same_folder_and_the_run_trains(fake_hub, tmp_path, monkeypatch):
    record(monkeypatch, fake_hub, VideoDataModule, "check", "data checked")
    record(monkeypatch, fake_hub, finetune.run, "check_trainable_modules", "targets checked")
    module = train(hub_cfg(tmp_path / "run", "trainer.max_steps=2"))
    assert module.trainer.global_step == 2
    kinds = [kind if kind != "fetched" else ("weight" if is_weight(name) else "other") for kind, name in
             fake_hub.events]
    data_at, targets_at = kinds.index("data checked"), kinds.index("targets checked")
    first_weight = kinds.index("weight")
    assert data_at < targets_at < first_weight  # every check passed before the first weight came
    assert "weight" not in kinds[:targets_at] and kinds[:data_at].count("other") >= 5  # configs, tokenizer first
    before = {name for kind, name in fake_hub.events[:data_at] if kind == "fetched"}
    assert {"model_index.json", "transformer/config.json", "tokenizer/tokenizer.json"} <= before
    assert "modeling_custom.py" not in before
    # the weights, and the rest, came afterwards into the same folder, each file once
    fetched = fake_hub.fetched()
    assert sorted(fetched) == sorted(fake_hub.remote_files()) and len(set(fetched)) == len(fetched)
    assert [c["revision"] for c in fake_hub.calls] == [None, COMMIT]
    assert module.family.checkpoint_dir == str(fake_hub.snapshot)


def test_weights_out_of_reach_after_the_checks_stop_with_the_fix(fake_hub, tmp_path, monkeypatch):
    """Offline with only the configs in the local cache, huggingface_hub raises when the weights are asked for
    (IncompleteSnapshotError, LocalEntryNotFoundError): the run says so, with the fix, after the data check."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    fake_hub.fail_on_revision = LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder")
    record(monkeypatch, fake_hub, VideoDataModule, "check", "data checked")
    loaded = []
    monkeypatch.setattr(finetune.run, "build_module", lambda *a, **k: loaded.append(a))
    with pytest.raises(ModelPathError, match=r"the weights could not be reached.*LocalEntryNotFoundError"
                                             r".*hf download fake-org/tiny-cogvideox.*preset=tiny"):
        build(hub_cfg(tmp_path / "run"))
    assert ("data checked", "") in fake_hub.events and not loaded
    assert not [name for name in fake_hub.fetched() if is_weight(name)]


def test_a_truncated_downloaded_weight_is_named_before_anything_loads(fake_hub, tmp_path, monkeypatch):
    weights = fake_hub.remote / "transformer" / "diffusion_pytorch_model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 100)
    loaded = []
    monkeypatch.setattr(finetune.run, "build_module", lambda *a, **k: loaded.append(a))
    with pytest.raises(ModelPathError, match=r"snapshots/0123456789abcdef\w+/transformer/diffusion_pytorch_model"
                                             r"\.safetensors is damaged"):
        build(hub_cfg(tmp_path / "run"))
    assert "transformer/diffusion_pytorch_model.safetensors" in fake_hub.fetched() and not loaded


def test_what_loads_a_model_outside_a_run_gets_the_weights(fake_hub, tmp_path):
    """`cogft generate/merge/export` build the family through `finetune.run.build_family`: the whole checkpoint."""
    family = finetune.run.build_family(hub_cfg(tmp_path / "run"))
    assert family.checkpoint_dir == str(fake_hub.snapshot) and len(fake_hub.calls) == 1
    assert {name for name in fake_hub.fetched() if is_weight(name)} == {
        name for name in fake_hub.remote_files() if is_weight(name)}


def test_tiny_and_local_folders_download_nothing(tiny_cogvideox, tmp_path, monkeypatch):
    def no_download(*args, **kwargs):
        raise AssertionError("snapshot_download was called")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    monkeypatch.setattr(finetune.run, "build_module", lambda cfg, checkpoint=None: (_ for _ in ()).throw(
        KeyboardInterrupt(checkpoint)))
    for path in ("tiny", tiny_cogvideox):
        with pytest.raises(KeyboardInterrupt) as reached:  # every check passed and the model would load now
            build(hub_cfg(tmp_path / "run", path=path))
        assert reached.value.args == (tiny_cogvideox,)


def test_offline_the_real_hub_client_serves_the_configs_from_its_cache_and_names_the_missing_weights(
        tiny_cogvideox, tmp_path, monkeypatch):
    """huggingface_hub itself, offline (HF_HUB_OFFLINE), on a local cache that holds the configs and tokenizer of a
    commit and its file listing but not its weights (an earlier run that stopped at a data error): the checks run on
    that folder, then the missing weights stop the run with the existing ModelPathError and its fix."""
    import hashlib

    from huggingface_hub import constants
    from huggingface_hub._tree_cache import TreeCacheEntry, write_tree_cache

    cache = tmp_path / "hf-cache"
    storage = cache / "models--fake-org--tiny-cogvideox"
    names = sorted(p.relative_to(tiny_cogvideox).as_posix() for p in Path(tiny_cogvideox).rglob("*") if p.is_file())
    for name in filter_repo_objects(names, allow_patterns=list(CHECK_FILES), ignore_patterns=list(NOT_CHECK_FILES)):
        (storage / "snapshots" / COMMIT / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(tiny_cogvideox) / name, storage / "snapshots" / COMMIT / name)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    write_tree_cache(str(storage), COMMIT, {
        name: TreeCacheEntry(size=(Path(tiny_cogvideox) / name).stat().st_size,
                             blob_id=hashlib.sha1(name.encode()).hexdigest()) for name in names})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    checked = []
    real_check = VideoDataModule.check
    monkeypatch.setattr(VideoDataModule, "check", lambda self: checked.append(self) or real_check(self))
    loaded = []
    monkeypatch.setattr(finetune.run, "build_module", lambda *a, **k: loaded.append(a))
    with pytest.raises(ModelPathError, match=r"the weights could not be reached \((LocalEntryNotFoundError|"
                                             r"IncompleteSnapshotError).*hf download fake-org/tiny-cogvideox"):
        build(hub_cfg(tmp_path / "run"))
    assert checked and not loaded  # the data was checked on the cached configs; nothing loaded
