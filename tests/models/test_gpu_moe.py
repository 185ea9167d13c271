"""The MoE's grouped-GEMM path on the GPU (`torch._grouped_mm`, bf16, compute capability 9.0+)
against the per-expert loop, at the small-hybrid's expert shapes. Skipped without such a GPU."""
from __future__ import annotations

import pytest
import torch

from posttrain.models.hybrid import SparseMoE
from posttrain.models.presets import preset_config

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
    reason="needs a CUDA GPU of compute capability 9.0+ (GPU-only test)",
)


def test_grouped_gemm_is_auto_on_and_matches_loop_in_bf16(moe_run):
    cfg = preset_config("small-hybrid", vocab_size=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    moe = SparseMoE(cfg).to("cuda", torch.bfloat16)
    x = torch.randn(16, 64, cfg.hidden_size, device="cuda", dtype=torch.bfloat16)
    moe.grouped_gemm = None
    assert moe.grouped(x.reshape(-1, cfg.hidden_size))  # auto: on for bf16 here
    got, ref = moe_run(moe, x, True), moe_run(moe, x, False)
    rel = lambda a, b: ((a.float() - b.float()).norm() / b.float().norm()).item()  # noqa: E731
    assert rel(got[0], ref[0]) < 1e-2 and rel(got[1], ref[1]) < 1e-2
    assert max(rel(a, b) for a, b in zip(got[2], ref[2])) < 2e-2
