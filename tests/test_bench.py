"""The benchmark harness builds real-size models from the published configs (on `meta` here: no GPU)."""

import sys

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))


def test_real_size_5b_harness_on_meta():
    from cogvideox_step import main

    result = main(["--size", "5b", "--device", "meta", "--frames", "9", "--height", "64", "--width", "64",
                   "--steps", "1", "--warmup", "0", "--dtype", "fp32"])
    # 42 blocks x 4 projections (q, k, v, out) x (A: 3072x128 + B: 128x3072)
    assert result["trainable_params"] == 42 * 4 * 2 * 3072 * 128


def test_tiny_step_on_cpu():
    from cogvideox_step import main

    result = main(["--size", "tiny", "--steps", "2", "--warmup", "1", "--rank", "4", "--alpha", "4"])
    assert result["cpu_s_per_step"] > 0 and result["trainable_params"] > 0


def test_cogvlm_17b_recipe_parameter_counts():
    from cogvlm_memory import main

    result = main([])
    lora_language = 32 * 10 * ((4096 + 12288) + (4096 + 4096))  # QKV and dense of the language expert
    lora_vit = 63 * 10 * ((1792 + 5376) + (1792 + 1792))  # ViT attention QKV and dense
    vit_mlps = 9 * (1792 * 15360 + 15360 + 15360 * 1792 + 1792)  # layers 46-54 fc1/fc2 with biases
    assert result["trainable_params"] == lora_language + lora_vit + vit_mlps
    assert 17.5e9 < result["total_params"] < 17.8e9  # CogVLM-17B


def test_encode_cache_epoch_and_entry_size(tmp_path):
    from encode_cache import main

    result = main(["--samples", "2", "--rounds", "1", "--work", str(tmp_path)])
    assert result["entries"] == 2 and result["epoch_s_from_cache"] > 0 and result["epoch_s_decode_and_encode"] > 0
    assert result["tiny_entry_payload_bytes"] == [result["tiny_formula_bytes"]]  # the size formula, on real files
    # 49x480x720 CogVideoX in bf16: mean + logvar of 16 x 13 x 60 x 90 latents, and 226 x 4096 T5 embeddings
    assert result["real_49x480x720_bf16"] == {"latent_moments": 2 * 16 * 13 * 60 * 90 * 2,
                                              "text_embeddings": 226 * 4096 * 2, "total": 6_344_192}


def test_step_overhead_kit_and_bare_loop_at_a_tiny_size():
    """bench/step_overhead.py: the kit's step through the Trainer and the bare loop, in this process, a few steps."""
    from step_overhead import main

    report = main(["--sizes", "tiny", "--pairs", "1", "--steps", "3", "--warmup", "1", "--in-process"])
    (pair,) = report["sizes"]["tiny"]["pairs"]
    assert pair["wall"]["kit_ms"] > 0 and pair["wall"]["bare_ms"] > 0 and pair["cpu"]["ratio"] > 0


def test_startup_phases_of_the_demo(cache_dir):
    """bench/startup.py: one run of the demo command to its first optimizer step, every phase timed."""
    from startup import PHASES, main

    report = main(["--runs", "0", "--cache", str(cache_dir), "--", "logger=csv"])
    first = report["kit_first"]
    assert all(first[name] >= 0 for name in PHASES) and first["total"] > first["imports"] > 0
