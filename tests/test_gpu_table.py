"""bench/gpu_table.py: the analytic FLOPs agree with torch's FlopCounterMode (at the real sizes on `meta`; CogVLM, whose
experts route tokens by a data-dependent mask the meta device cannot run, at small all-different widths on the CPU,
which pins the formula's every term), and the harness runs its table at a tiny size on CPU, writing JSON and
markdown."""

import json
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.parametrize("name", ["cogvideox-5b-lora", "cogvideox15-5b-lora", "cogvideox-2b-sft",
                                  "cogview4-6b-lora"])
def test_analytic_flops_equal_the_flop_counter(name):
    from gpu_table import analytic_forward_flops, counted_forward_flops

    assert analytic_forward_flops(name)["forward"] == pytest.approx(counted_forward_flops(name), rel=1e-6)


def test_cogvlm_analytic_flops_equal_the_flop_counter():
    from gpu_table import analytic_forward_flops, counted_forward_flops

    counted = counted_forward_flops("cogvlm-captcha-lora", small=True, device="cpu")
    assert analytic_forward_flops("cogvlm-captcha-lora", small=True)["forward"] == pytest.approx(counted, rel=1e-9)


def test_real_sizes():
    """The token counts and sizes the table runs at: docs/memory.md#what-the-official-runs-report's 5B LoRA step (about 1.2e15 FLOPs at
    49x480x720 with activation checkpointing, model FLOPs plus the recomputed forward); CogView4-6B at 1024^2 (4096
    image tokens, 6B parameters); CogVLM-17B at 490 (1227 image tokens, ~17B parameters)."""
    from gpu_table import analytic_forward_flops, bench, step_model_flops

    video = bench("cogvideox-5b-lora")
    assert video.tokens(video.build("meta", torch.float32).transformer.config) == (17550, 226)
    forward = analytic_forward_flops("cogvideox-5b-lora")
    assert step_model_flops(forward, "lora") + forward["forward"] == pytest.approx(1.2e15, rel=0.05)

    image = bench("cogview4-6b-lora")
    transformer = image.build("meta", torch.float32).transformer
    assert image.tokens(transformer.config) == (4096, 128)
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(6.4e9, rel=0.05)

    vlm = bench("cogvlm-captcha-lora")
    model = vlm.build("meta", torch.bfloat16).model
    assert vlm.tokens(model.config) == (1227, 13)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(17.6e9, rel=0.05)


def test_small_table_on_cpu(tmp_path):
    from gpu_table import main

    report = main(["--small", "--device", "cpu", "--configs", "cogview4-6b-lora", "cogvlm-captcha-lora", "--savers",
                   "plain", "checkpointing+swap-half", "checkpointing+fp8", "--steps", "1", "--warmup", "0",
                   "--json", str(tmp_path / "t.json"), "--markdown", str(tmp_path / "t.md")])
    status = {(row["config"], row["saver"]): row["status"] for row in report["rows"]}
    assert status.pop(("cogvlm-captcha-lora", "checkpointing+fp8")).startswith("n/a (FP8 storage is diffusers'")
    assert set(status.values()) == {"ok"}, status
    measured = [row for row in report["rows"] if row["status"] == "ok"]
    assert len(measured) == 5 and all(row["s_per_step"] > 0 and row["model_flops_per_step"] > 0 for row in measured)
    assert json.loads((tmp_path / "t.json").read_text())["rows"][1]["saver"] == "checkpointing+swap-half"
    table = (tmp_path / "t.md").read_text()
    assert "a harness check, not a benchmark" in table and table.count("| cogvlm-captcha-lora | 56px |") == 3
    report = main(["--small", "--device", "cpu", "--configs", "cogvideox-2b-lora", "--savers", "plain",
                   "checkpointing+swap-half", "--steps", "1", "--warmup", "0"])
    assert [row["status"] for row in report["rows"]] == ["ok", "ok"]
