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
