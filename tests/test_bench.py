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
