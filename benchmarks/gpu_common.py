"""Shared helpers of the GPU benchmarks (benchmarks/gpu_*.py): timing, bandwidth, tables, JSON.

Each benchmark also runs on CPU at tiny sizes (`--smoke`), so a script is known to work
before it spends device time.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch


def out_dir() -> Path:
    """$OUT on the device machine, else ./benchmark_out (created)."""
    path = Path(os.environ.get("OUT") or "benchmark_out")
    path.mkdir(parents=True, exist_ok=True)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, *, warmup: int = 1, reps: int = 3) -> float:
    """Median wall milliseconds of fn() (device synchronised around each call)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def time_ms_adaptive(fn: Callable[[], object], device: torch.device, *, reps: int = 5, slow_ms: float = 1500.0) -> float:
    """Median wall ms of fn() after one untimed warm-up call (autotuning, allocator growth);
    a point whose first timed call takes over `slow_ms` is not repeated (seconds-long calls
    vary little, and repeating 30 s softmax points would eat a device call)."""
    fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    first = (time.perf_counter() - start) * 1e3
    if first > slow_ms or reps <= 1:
        return first
    return statistics.median([first] + [time_ms(fn, device, warmup=0, reps=1) for _ in range(reps - 1)])


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30) -> float:
    """Measured device-to-device copy bandwidth, bytes/s counting bytes read plus written."""
    n = nbytes // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup=2, reps=10)
    del src, dst
    return 2 * n * 2 / (ms / 1e3)


def matmul_tflops(device: torch.device, n: int = 8192) -> float:
    """Measured bf16 matrix-product rate (TFLOP/s) of an n x n x n product (n = 256 on CPU)."""
    n = n if device.type == "cuda" else 256
    a, b = (torch.randn(n, n, device=device).to(torch.bfloat16) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, warmup=3, reps=10)
    return 2 * n**3 / (ms / 1e3) / 1e12


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> Optional[float]:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def print_table(title: str, columns: list[str], rows: list[list[object]]) -> None:
    """Plain markdown table (pastes into docs/gpu.md as is)."""
    print(f"\n### {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "|".join("---" for _ in columns) + "|")
    for row in rows:
        print("| " + " | ".join(_fmt(x) for x in row) + " |")


def _fmt(x: object) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:,.3g}" if abs(x) < 100 else f"{x:,.0f}"
    return str(x)


def save_json(name: str, payload: dict) -> Path:
    path = out_dir() / name
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path


def device_info(device: torch.device) -> dict:
    info = {"device": str(device), "torch": torch.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2**30
    try:
        import fla  # noqa: F401

        info["fla"] = getattr(fla, "__version__", "?")
    except Exception:  # noqa: BLE001
        info["fla"] = None
    return info


class Budget:
    """Wall-clock budget of one script: later (more expensive) points are skipped, and say so."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()
