"""bench/gpu_table.py: the analytic FLOPs agree with torch's FlopCounterMode at the real sizes (on `meta`), and the
harness runs its table at a tiny size on CPU, writing JSON and markdown."""

import json
import sys

import pytest
import torch
from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


@pytest.mark.parametrize("name, lora_rank", [("cogvideox-5b-lora", 128), ("cogvideox15-5b-lora", 128),
                                             ("cogvideox-2b-sft", 0)])
def test_analytic_flops_equal_the_flop_counter(name, lora_rank):
    from gpu_table import CONFIGS, build_family, counted_forward_flops, model_flops

    c = CONFIGS[name]
    family = build_family(c["size"], "meta", torch.float32, c["frames"], c["height"], c["width"])
    analytic = model_flops(family.transformer.config, c["frames"], c["height"], c["width"], lora_rank)["forward"]
    counted = counted_forward_flops(c["size"], c["frames"], c["height"], c["width"], lora_rank, None)
    assert analytic == pytest.approx(counted, rel=1e-3)


def test_5b_lora_step_matches_the_reference_estimate():
    """REFERENCE section 5: about 1.2e15 FLOPs for a 5B LoRA step at 49x480x720 with activation checkpointing
    (model FLOPs plus the recomputed forward)."""
    from gpu_table import CONFIGS, build_family, model_flops, step_model_flops, tokens

    c = CONFIGS["cogvideox-5b-lora"]
    cfg = build_family("5b", "meta", torch.float32, c["frames"], c["height"], c["width"]).transformer.config
    assert tokens(cfg, 49, 480, 720) == (17550, 226)
    forward = model_flops(cfg, 49, 480, 720, lora_rank=128)
    assert step_model_flops(forward, "lora") + forward["forward"] == pytest.approx(1.2e15, rel=0.05)


def test_small_table_on_cpu(tmp_path):
    from gpu_table import main

    report = main(["--small", "--device", "cpu", "--configs", "cogvideox-2b-lora", "--savers", "plain",
                   "checkpointing+swap-half", "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "t.json"),
                   "--markdown", str(tmp_path / "t.md")])
    assert [row["status"] for row in report["rows"]] == ["ok", "ok"]
    assert all(row["s_per_step"] > 0 and row["model_flops_per_step"] > 0 for row in report["rows"])
    assert json.loads((tmp_path / "t.json").read_text())["rows"][1]["saver"] == "checkpointing+swap-half"
    table = (tmp_path / "t.md").read_text()
    assert "a harness check, not a benchmark" in table and table.count("| cogvideox-2b-lora |") == 2
