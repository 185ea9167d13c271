"""Which fla kernel configs get pinned, and when (models/fla_tuning.py).

The pinning itself (Triton autotuners left with one config, results unchanged) runs in
tests/models/test_gpu_lightning.py on a GPU.
"""
from __future__ import annotations

import importlib.util

import pytest

from posttrain.models.fla_tuning import PINNED, pin_for, pinned_configs


def test_an_h200_gets_both_state_kernels_pinned():
    for name in ("NVIDIA H200", "NVIDIA H200 NVL"):
        configs = pinned_configs(name, environ={})
        assert set(configs) == {"chunk_fwd_kernel_h", "chunk_bwd_kernel_dh"}
        for cfg in configs.values():
            assert cfg["kwargs"]["BK"] in (32, 64) and cfg["kwargs"]["BV"] in (32, 64)  # fla's BKV_LIST
            assert cfg["num_warps"] in (1, 2, 4, 8) and cfg["num_stages"] in (2, 3, 4)


def test_other_gpus_and_the_opt_out_keep_autotuning():
    assert pinned_configs("NVIDIA H100 80GB HBM3", environ={}) == {}
    assert pinned_configs("NVIDIA A100-SXM4-80GB", environ={}) == {}
    assert pinned_configs("NVIDIA H200", environ={"POSTTRAIN_FLA_AUTOTUNE": "1"}) == {}
    assert pinned_configs("NVIDIA H200", environ={"POSTTRAIN_FLA_AUTOTUNE": "0"}) == PINNED["NVIDIA H200"]


@pytest.mark.skipif(importlib.util.find_spec("fla") is not None, reason="fla is installed here")
def test_without_fla_kernels_pinning_warns_and_training_goes_on():
    with pytest.warns(UserWarning, match="not pinned"):
        assert pin_for("NVIDIA H200") == []
    assert pin_for("NVIDIA A100-SXM4-80GB") == []  # nothing to pin: not even a warning
