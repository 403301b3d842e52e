"""Shared helpers of the bench scripts: matmul peak, peak memory, timing, tables, JSON, machine facts.

Not part of the package: the scripts in ``bench/`` import it as a sibling module.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedsp.models.loading import resolve_device
from fedsp.models.precision import ATTENTION_CHOICES, cpu_info, native_bfloat16

RESULTS = Path("results") / "bench"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """--device, --out (default results/bench/<name>.json)."""
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="JSON file to write")


def attention_arg(parser: argparse.ArgumentParser) -> None:
    """--attention: the kernel the loaded models use."""
    parser.add_argument(
        "--attention",
        default="auto",
        choices=ATTENTION_CHOICES,
        help="attention kernel (auto: eager for bfloat16 on a CPU, else sdpa)",
    )


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(
    dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 10, budget_s: float = 10.0
) -> tuple[float, float]:
    """Best GFLOP/s of a (size x size) @ (size x size) matmul (2 * size^3 FLOPs), and seconds of one.

    Stops repeating once ``budget_s`` is spent: on a CPU without native bfloat16
    kernels one bfloat16 matmul can take minutes.
    """
    return matmul_rate(dtype, device, size, size, size, repeats, budget_s)


def matmul_rate(
    dtype: torch.dtype,
    device: torch.device,
    m: int,
    k: int,
    n: int,
    repeats: int = 10,
    budget_s: float = 10.0,
) -> tuple[float, float]:
    """Best GFLOP/s of an (m x k) @ (k x n) matmul (2 * m * k * n FLOPs), and seconds of one."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    a @ b  # warm-up: thread pool, kernel selection
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        seconds = time.perf_counter() - start
        best, spent = min(best, seconds), spent + seconds
        if spent > budget_s:
            break
    return 2 * m * k * n / best / 1e9, best


def rss_mb() -> float:
    """Resident memory of this process now, in MB (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3


class PeakMemory:
    """Peak resident memory (MB) while the ``with`` block runs, sampled every 5 ms; CUDA peak too."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_rss = 0.0
        self.peak_cuda = 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_mb())
            self._stop.wait(0.005)

    def __enter__(self) -> PeakMemory:
        self.peak_rss = rss_mb()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, rss_mb())
        if self.device.type == "cuda":
            self.peak_cuda = torch.cuda.max_memory_allocated(self.device) / 1e6


def time_call(fn: Callable[[], Any], device: torch.device) -> tuple[float, PeakMemory]:
    """Seconds one call of ``fn`` takes (device synchronised), and the peak memory during it."""
    with PeakMemory(device) as memory:
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        seconds = time.perf_counter() - start
    return seconds, memory


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, including the load average at the time (CPU is shared)."""
    info: dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "load_avg": list(os.getloadavg()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu_model"] = cpu_info().get("model name") or platform.processor() or platform.machine()
        info["native_bfloat16"] = native_bfloat16("cpu")
    return info


def resolve(name: str) -> torch.device:
    return resolve_device(name)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A GitHub-flavoured markdown table (pastes into docs/performance.md as is)."""
    cells = [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in cells:
        print("| " + " | ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) + " |")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    print(f"wrote {path}")
