"""Exact resume after an interruption at any point: SIGINT and SIGTERM delivered at seeded random steps and phases
(data loading, inside the step, between optimizer and scheduler, during validation samples, during a checkpoint
write) leave a checkpoint from which the run continues as the uninterrupted one (the same losses, bitwise the same
adapter on CPU), or -- a second signal -- no new checkpoint at all. Also `ckpt_path=auto`, status.json, `latest`."""

from __future__ import annotations

import json
import random
import re
import signal

import pytest
import torch
from conftest import compose
from interrupt_harness import PHASES, RECORDS

from finetune.checkpointing import RunInterrupted
from finetune.run import train, train_command

MAX_STEPS = 8
# Validation samples at global steps 2, 4, 6, 8 (after step index 1, 3, 5, 7); last.ckpt after step index 2 and 5.
AT = {"validation": (1, 3, 5), "checkpoint": (2, 5)}


def config(run_dir, *extra: str):
    return compose(["recipe=cogvideox_lora", "preset=tiny", "logger=none", f"run_dir={run_dir}", "data.demo_count=3",
                    f"trainer.max_steps={MAX_STEPS}", "lr_scheduler=cosine", "lr_scheduler.warmup_steps=3",
                    "callbacks.checkpoint.every_n_train_steps=3", "callbacks.samples.every_n_steps=2",
                    "callbacks.samples.at_end=false", "callbacks.samples.generate_kwargs.num_inference_steps=1",
                    "+callbacks.losses._target_=interrupt_harness.StepLosses", *extra])


def points(count: int = 22, seed: int = 24) -> list[tuple[str, int, str]]:
    """`count` (phase, step index, signal): every phase twice, the rest drawn at random; seeded."""
    draw = random.Random(seed)
    phases = [*PHASES, *PHASES]
    phases += [draw.choice(PHASES) for _ in range(count - len(phases))]
    chosen = []
    for i, phase in enumerate(phases):
        step = draw.choice(AT.get(phase, range(MAX_STEPS - 1)))
        chosen.append((phase, step, ("SIGINT", "SIGTERM")[i % 2]))
    return chosen


def losses_of(run_dir) -> dict:
    """Every micro-batch's loss of the runs in `run_dir`, each recorded once."""
    records = RECORDS.pop(str(run_dir), [])
    keys = [key for key, _ in records]
    assert len(keys) == len(set(keys)), "a batch was trained twice"
    return dict(records)


def weights_of(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.trainable_state_dict().items()}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    module = train(config(run_dir))
    return weights_of(module), losses_of(run_dir)


def signal_at(phase: str, step: int, signame: str, count: int = 1) -> list[str]:
    return ["+callbacks.signal._target_=interrupt_harness.SignalAt", f"+callbacks.signal.step={step}",
            f"+callbacks.signal.phase={phase}", f"+callbacks.signal.signame={signame}",
            f"+callbacks.signal.count={count}"]


def assert_same_run(weights: dict, losses: dict, reference) -> None:
    ref_weights, ref_losses = reference
    assert losses == ref_losses
    assert weights.keys() == ref_weights.keys()
    for key in weights:
        assert torch.equal(weights[key], ref_weights[key]), key


def test_the_points_cover_every_phase_and_both_signals():
    chosen = points()
    assert len(chosen) >= 20
    assert {p for p, _, _ in chosen} == set(PHASES)
    assert {s for _, _, s in chosen} == {"SIGINT", "SIGTERM"}


@pytest.mark.parametrize("phase, step, signame", points())
def test_an_interrupted_run_resumes_exactly(tmp_path, uninterrupted, phase, step, signame):
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(RunInterrupted) as stopped:
        train(config(tmp_path, *signal_at(phase, step, signame)))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers  # handlers given back
    # the step the signal landed in was finished, and the checkpoint written at its end
    assert stopped.value.signame == signame and stopped.value.step == step + 1
    saved = tmp_path / "checkpoints" / "on_exception.ckpt"
    assert torch.load(saved, weights_only=True)["global_step"] == step + 1
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "interrupted" and status["step"] == step + 1
    assert status["resume"].endswith(f"run_dir={tmp_path.resolve()} ckpt_path=on_exception")
    resumed = train(config(tmp_path, "ckpt_path=on_exception"))
    assert_same_run(weights_of(resumed), losses_of(tmp_path), uninterrupted)
    assert not saved.exists()  # a finished run removes it
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "finished"


ACCUMULATE = ["trainer.accumulate_grad_batches=2", "trainer.max_steps=4"]


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("accumulated")
    module = train(config(run_dir, *ACCUMULATE))
    return weights_of(module), losses_of(run_dir)


@pytest.mark.parametrize("phase", ["forward", "optimizer"])
def test_inside_an_accumulation_window_the_run_stops_at_the_window_end(tmp_path, accumulated, phase):
    """Two micro-batches a step: a signal in the first waits for the second and the optimizer step (the accumulated
    gradients are no checkpointed state)."""
    accumulate, reference = ACCUMULATE, accumulated
    with pytest.raises(RunInterrupted) as stopped:
        train(config(tmp_path, *accumulate, *signal_at(phase, 1, "SIGTERM")))
    assert stopped.value.step == 2
    resumed = train(config(tmp_path, *accumulate, "ckpt_path=on_exception"))
    assert_same_run(weights_of(resumed), losses_of(tmp_path), reference)


def test_a_second_signal_stops_at_once_and_writes_no_checkpoint(tmp_path, uninterrupted):
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):  # Lightning's immediate Ctrl-C path: exit status 1
        train(config(tmp_path, *signal_at("forward", 4, "SIGINT", count=2)))
    assert signal.getsignal(signal.SIGINT) == handler  # Ctrl-C works again afterwards
    assert not (tmp_path / "checkpoints" / "on_exception.ckpt").exists()  # no half-done step saved
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "interrupted" and status["resume"].endswith("ckpt_path=auto")
    # the newest checkpoint is last.ckpt of step 3 (every 3 steps): `auto` resumes from it, exactly
    losses_of(tmp_path)  # steps 4-5 ran in the stopped run and are trained again: forget them
    resumed = train(config(tmp_path, "ckpt_path=auto"))
    ref_weights, ref_losses = uninterrupted
    assert losses_of(tmp_path) == {k: v for k, v in ref_losses.items() if k[0] >= 4}
    assert_same_run(weights_of(resumed), ref_losses, (ref_weights, ref_losses))


def test_auto_starts_afresh_in_an_empty_run_dir_and_resumes_a_populated_one(tmp_path, uninterrupted):
    train(config(tmp_path, "ckpt_path=auto", "trainer.max_steps=3"))  # nothing there: a fresh start
    assert json.loads((tmp_path / "status.json").read_text())["step"] == 3
    resumed = train(config(tmp_path, "ckpt_path=auto"))  # the checkpoint of step 3: continues to 8
    assert resumed.trainer.global_step == MAX_STEPS
    assert_same_run(weights_of(resumed), losses_of(tmp_path), uninterrupted)


def test_the_console_says_how_to_resume_and_the_exit_status_is_the_signals(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        train_command(config(tmp_path, *signal_at("backward", 2, "SIGTERM")))
    assert exited.value.code == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "SIGTERM received: finishing the current step" in err
    assert f"resume with:\n  python train.py run_dir={tmp_path.resolve()} ckpt_path=on_exception" in err
    losses_of(tmp_path)


def test_status_and_latest_after_finished_failed_and_interrupted_runs(tmp_path):
    import lightning as L  # noqa: F401

    from finetune import runs

    outputs = tmp_path / "outputs" / "cogvideox_lora"
    finished = outputs / "a"
    train(config(finished, "trainer.max_steps=2"))
    assert (outputs / "latest").resolve() == finished.resolve()
    assert json.loads((finished / "status.json").read_text())["exports"] == [str(finished / "export")]
    with pytest.raises(RunInterrupted):
        train(config(outputs / "b", *signal_at("forward", 1, "SIGINT")))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(outputs / "c", "+callbacks.crash._target_=test_training.Crash"))
    assert (outputs / "latest").resolve() == finished.resolve()  # only a finished run becomes `latest`
    failed = json.loads((outputs / "c" / "status.json").read_text())
    assert failed["status"] == "failed" and "simulated crash" in failed["error"]
    assert failed["resume"].endswith("ckpt_path=auto")  # the crash's checkpoint
    table = runs.runs_table(tmp_path / "outputs")
    lines = table.splitlines()
    assert [line.split()[1] for line in lines if not line.startswith(" ")] == ["finished", "interrupted", "failed"]
    assert f"export: {finished / 'export'}" in table and "ckpt_path=on_exception" in table
    for run in "abc":
        losses_of(outputs / run)


def test_cogft_runs_lists_the_runs(tmp_path, capsys):
    from finetune.cogft import run

    run_dir = tmp_path / "outputs" / "cogvideox_lora" / "first"
    train(config(run_dir, "trainer.max_steps=1", "callbacks.samples.every_n_steps=0"))
    losses_of(run_dir)
    (tmp_path / "outputs" / "other" / "killed").mkdir(parents=True)  # a folder of a run that left no status
    (tmp_path / "outputs" / "other" / "killed" / "config.yaml").write_text("name: other\n")
    capsys.readouterr()
    run(["runs", str(tmp_path / "outputs")])
    out = capsys.readouterr().out
    assert re.search(rf"finished +1/1  {re.escape(str(run_dir))}\n", out)
    assert "unknown (no status.json)" in out and "latest" not in out  # the link is not a second run


def test_the_sbatch_example_composes():
    """docs/run-safety.md's SLURM script: a fixed run_dir per job and ckpt_path=auto, composed as train.py would."""
    import shlex

    from test_readme import block_after

    script = block_after("sbatch", "docs/run-safety.md")
    assert "--requeue" in script and "--signal=B:TERM@" in script
    (command,) = [line for line in script.splitlines() if line.startswith("srun python train.py ")]
    overrides = shlex.split(command.replace("${SLURM_JOB_ID}", "1234"))[3:]
    cfg = compose(overrides)
    assert cfg.ckpt_path == "auto" and cfg.run_dir == "outputs/cogvideox_lora/job_1234"
    assert cfg.strategy._target_.endswith("DDPStrategy") or "ddp" in str(cfg.strategy)


def test_a_failed_runs_folder_as_adapter_path_stops_before_the_model_loads(tmp_path, monkeypatch):
    from finetune import run as run_module
    from finetune.errors import PathSettingError

    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config(failed, "+callbacks.crash._target_=test_training.Crash", "callbacks.samples.every_n_steps=0"))
    losses_of(failed)
    monkeypatch.setattr(run_module, "build_module", lambda *a, **k: pytest.fail("the model was loaded"))
    for given in (failed, failed / "export"):
        with pytest.raises(PathSettingError, match=r"did not finish: failed \(RuntimeError: simulated crash\).*"
                                                   r"cogft runs.*ckpt_path=auto"):
            run_module.build(config(tmp_path / "eval", "mode=test", f"adapter_path={given}"))
    with pytest.raises(PathSettingError, match="does not exist"):
        run_module.build(config(tmp_path / "eval", "mode=test", f"adapter_path={tmp_path / 'nothing'}"))


@pytest.mark.slow
def test_ctrl_c_to_the_whole_process_group_with_loader_workers(tmp_path):
    """As a terminal delivers Ctrl-C (and SLURM its SIGTERM): to every process of the group, the data loader's worker
    included, in a train.py process of its own session. The printed resume command, run as printed, gives the
    uninterrupted run's export bitwise."""
    import os
    import shlex
    import subprocess
    import sys

    from conftest import REPO, TEST_DIRS
    from safetensors.torch import load_file
    from test_console import QUIETED

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*TEST_DIRS, os.environ.get("PYTHONPATH", "")])}
    base = ["recipe=cogvideox_lora", "preset=tiny", "logger=none", "data.num_workers=1", "data.demo_count=3",
            "trainer.max_steps=6", "callbacks.samples.every_n_steps=0", "callbacks.samples.at_end=false"]

    def train_py(args: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300, start_new_session=True)

    def export(run_dir) -> dict:
        return load_file(run_dir / "export" / "pytorch_lora_weights.safetensors")

    train(compose([*base, f"run_dir={tmp_path / 'whole'}"]))  # the uninterrupted run, in this process
    reference = export(tmp_path / "whole")
    for signame in ("SIGINT", "SIGTERM"):
        run_dir = tmp_path / signame
        stopped = train_py([*base, f"run_dir={run_dir}", *signal_at("forward", 3, signame), "+callbacks.signal.group=true"])
        assert stopped.returncode == 128 + getattr(signal, signame), stopped.stderr[-2000:]
        resume = stopped.stderr.split("resume with:\n", 1)[1].splitlines()[0].strip()
        assert resume.startswith("python train.py ") and resume.endswith(f"run_dir={run_dir} ckpt_path=on_exception")
        resumed = train_py(shlex.split(resume)[2:])
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        for quieted in QUIETED:  # e.g. Lightning's "checkpoint directory exists": resuming is why it does
            assert not re.search(quieted, resumed.stdout + resumed.stderr), quieted
        assert "Restored all states from the checkpoint" in resumed.stderr + resumed.stdout
        weights = export(run_dir)
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in weights), signame


def cogvlm_config(run_dir, *extra: str):
    """The CogVLM captcha demo (where an interrupted run once resumed inexactly), shortened: 6 steps, validation by
    decoding every 2 steps, a loader worker as in the preset."""
    return compose(["recipe=cogvlm_captcha_lora", "preset=tiny", "logger=none", f"run_dir={run_dir}",
                    "trainer.max_steps=6", "trainer.val_check_interval=2", "data.demo_count=60",
                    "data.split_fractions=[0.8,0.05,0.15]", "data.batch_size=8", "callbacks.checkpoint.every_n_train_steps=4",
                    "+callbacks.losses._target_=interrupt_harness.StepLosses", *extra])


@pytest.fixture(scope="module")
def cogvlm_uninterrupted(tmp_path_factory, tiny_cogvlm):
    run_dir = tmp_path_factory.mktemp("cogvlm_whole")
    module = train(cogvlm_config(run_dir))
    return weights_of(module), losses_of(run_dir)


@pytest.mark.parametrize("phase, step, signame", [("validation", 1, "SIGINT"), ("batch_start", 2, "SIGTERM"),
                                                  ("forward", 4, "SIGINT")])
def test_the_cogvlm_demo_resumes_exactly(tmp_path, cogvlm_uninterrupted, phase, step, signame):
    reference = cogvlm_uninterrupted
    with pytest.raises(RunInterrupted) as stopped:
        train(cogvlm_config(tmp_path, *signal_at(phase, step, signame)))
    assert stopped.value.step == step + 1
    resumed = train(cogvlm_config(tmp_path, "ckpt_path=on_exception"))
    assert_same_run(weights_of(resumed), losses_of(tmp_path), reference)


def test_a_run_killed_without_a_word_is_listed_as_killed_with_its_resume_command(tmp_path):
    from finetune import runs

    run_dir = tmp_path / "outputs" / "cogvideox_lora" / "gone"
    train(config(run_dir, "trainer.max_steps=3", "callbacks.samples.every_n_steps=0"))
    losses_of(run_dir)
    # as SIGKILL leaves it: status.json still says running, for a process that no longer exists
    dead = 2 ** 22 + 12345
    runs.write_status(run_dir, status="running", pid=dead, resume=None,
                      resume_if_killed=runs.resume_command(run_dir, "auto", ["recipe=cogvideox_lora"]))
    assert not runs.pid_alive(dead)
    status = runs.describe(run_dir)
    assert status["status"] == "killed"
    assert status["resume"] == f"python train.py recipe=cogvideox_lora run_dir={run_dir.resolve()} ckpt_path=auto"


def test_the_ema_resumes_exactly_after_an_interruption(tmp_path, tmp_path_factory):
    """The interruption checkpoint holds the EMA of the step it was written at, and the resumed EMA is bitwise the
    uninterrupted one's."""
    from finetune.ema import EMA

    ema = ["callbacks.ema.decay=0.9", "trainer.max_steps=5", "callbacks.samples.every_n_steps=0"]

    def shadow(module):
        (callback,) = [c for c in module.trainer.callbacks if isinstance(c, EMA)]
        return callback.shadow

    reference_dir = tmp_path_factory.mktemp("ema_whole")
    reference = shadow(train(config(reference_dir, *ema)))
    losses_of(reference_dir)
    with pytest.raises(RunInterrupted):
        train(config(tmp_path, *ema, *signal_at("forward", 2, "SIGINT")))
    resumed = shadow(train(config(tmp_path, *ema, "ckpt_path=on_exception")))
    losses_of(tmp_path)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
