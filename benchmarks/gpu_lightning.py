"""Lightning attention layer on the GPU: fla kernel vs the pure-torch chunked reference vs
softmax attention (SDPA, flash backend), forward and forward+backward, and the fraction of the
memory-bandwidth floor the fla forward reaches.

One sequence of T tokens, H heads of dim D, bf16. Floor = bytes that must move (forward:
read q, k, v, write o; forward+backward: that, then read q, k, v, do and write dq, dk, dv) over the measured
copy bandwidth (reads + writes of a large device-to-device copy). The lightning math is
~(4C + 4D) D flops per token and head forward (chunk C = 64): at H=64, D=128 that is 0.4x
to 0.5x the byte time at the measured matrix rate, so the byte floor binds, but not by much
(the script prints both).

    python3 benchmarks/gpu_lightning.py            # H=64, D=128, T in 8K..512K
    python3 benchmarks/gpu_lightning.py --smoke    # CPU, tiny: checks the script only
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from gpu_common import (
    Budget, copy_bandwidth, device_info, matmul_tflops, free, is_oom, peak_gib, print_table, save_json, time_ms_adaptive,
)
from posttrain.models.lightning import lightning_attention, lightning_attention_torch, lightning_slopes


def run_point(fn, device, reps):
    """(median ms, peak GiB) or (reason string, None)."""
    free(device)
    try:
        ms = time_ms_adaptive(fn, device, reps=reps)
        return ms, peak_gib(device)
    except Exception as err:  # noqa: BLE001
        if is_oom(err):
            free(device)
            return "OOM", None
        return f"error: {type(err).__name__}: {str(err)[:80]}", None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 32768, 131072, 524288])
    ap.add_argument("--torch-max", type=int, default=131072,
                    help="longest T for the pure-torch reference (fp32 chunk states: ~40 GB forward at 128K, H=64)")
    ap.add_argument("--sdpa-max", type=int, default=524288, help="longest T for softmax attention (quadratic)")
    ap.add_argument("--budget", type=float, default=150.0, help="seconds for the whole script")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny sizes")
    args = ap.parse_args()
    if args.smoke:
        device = torch.device("cpu")
        args.heads, args.dim, args.lengths, args.torch_max, args.sdpa_max = 2, 16, [256, 512], 512, 256
    else:
        device = torch.device("cuda")
    budget = Budget(args.budget)
    H, D, dtype = args.heads, args.dim, torch.bfloat16
    bw = copy_bandwidth(device, nbytes=(2 << 30) if device.type == "cuda" else (64 << 20))
    tflops = matmul_tflops(device)
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s", flush=True)
    slopes = lightning_slopes(H, 0, 16, device=device)
    results, rows = [], []
    for T in args.lengths:
        gen = torch.Generator(device=device).manual_seed(T)
        q, k, v = (F.silu(torch.randn(1, T, H, D, device=device, generator=gen)).to(dtype) * D**-0.5 for _ in range(3))
        do = torch.randn_like(q)
        tensor_bytes = q.numel() * q.element_size()
        floor_fwd_ms = 4 * tensor_bytes / bw * 1e3
        # forward+backward: the forward's 4 tensors, then read q, k, v, do and write dq, dk, dv
        floor_bwd_ms = 7 * tensor_bytes / bw * 1e3 + floor_fwd_ms
        reps = 5 if T <= 131072 else 3
        flop_fwd_ms = (4 * 64 + 4 * D) * D * T * H / (tflops * 1e12) * 1e3  # chunk 64, matmul rate
        point = {"T": T, "floor_fwd_ms": floor_fwd_ms, "floor_fwd_bwd_ms": floor_bwd_ms, "flop_fwd_ms": flop_fwd_ms}

        def fwd(f):
            return lambda: f(q, k, v, slopes)

        def fwd_bwd(f):
            def go():
                qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
                o, _ = f(qq, kk, vv, slopes)
                torch.autograd.grad(o, (qq, kk, vv), do)
            return go

        def sdpa(qq, kk, vv, _slopes):  # the flash kernel on CUDA (the reference)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION] if qq.is_cuda else [SDPBackend.MATH]):
                o = F.scaled_dot_product_attention(qq.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), is_causal=True)
            return o.transpose(1, 2), None

        candidates = [("fla" if device.type == "cuda" else "chunked(cpu)", lightning_attention, True)]
        candidates.append(("torch chunked", lightning_attention_torch, T <= args.torch_max))
        candidates.append(("sdpa softmax", sdpa, T <= args.sdpa_max))
        for name, f, enabled in candidates:
            for mode, make in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                key = f"{name} {mode}"
                if not enabled:
                    point[key] = "skipped (size limit)"
                elif budget.left() < 0:
                    point[key] = "skipped (time budget)"
                else:
                    ms, mem = run_point(make(f), device, reps)
                    point[key] = ms
                    point[key + " peak GiB"] = mem
                    print(f"T={T} {key}: {ms} ms, peak {mem} GiB", flush=True)  # progress (autotuning is slow)
        del q, k, v, do
        results.append(point)
        main_name = candidates[0][0]
        fl_f, fl_b = point.get(f"{main_name} fwd"), point.get(f"{main_name} fwd+bwd")
        rows.append([
            T, fl_f, fl_b, point.get("torch chunked fwd"), point.get("torch chunked fwd+bwd"),
            point.get("sdpa softmax fwd"), point.get("sdpa softmax fwd+bwd"),
            f"{floor_fwd_ms:.3g} / {floor_bwd_ms:.3g}", f"{flop_fwd_ms:.3g}",
            f"{floor_fwd_ms / fl_f:.0%}" if isinstance(fl_f, float) else "-",
            f"{floor_bwd_ms / fl_b:.0%}" if isinstance(fl_b, float) else "-",
        ])
        print(point, flush=True)
    info = device_info(device) | {"copy_bandwidth_TBps": bw / 1e12, "matmul_TFLOPs": tflops, "H": H, "D": D, "dtype": str(dtype)}
    save_json("gpu_lightning.json", {"info": info, "results": results})
    print_table(
        f"Lightning attention layer, H={H}, D={D}, bf16, one sequence, ms (median) on {info.get('gpu', 'cpu')}; "
        f"copy bandwidth {bw / 1e12:.2f} TB/s, bf16 matmul {tflops:.0f} TFLOP/s",
        ["T", "fla fwd", "fla fwd+bwd", "torch fwd", "torch fwd+bwd", "SDPA fwd", "SDPA fwd+bwd",
         "byte floor fwd / fwd+bwd", "flop time fwd", "fla fwd: floor/measured", "fla fwd+bwd: floor/measured"],
        rows,
    )


if __name__ == "__main__":
    main()
