"""The machine's matmul peak in float32 and bfloat16: the yardstick of every other bench figure.

    .venv/bin/python bench/peak.py [--sizes 512 1024 2048 4096] [--step-tokens 64 256 1024]
                                   [--device auto|cpu|cuda] [--out FILE.json]

Best of ``--repeats`` timings of a square matmul (2 * n^3 FLOPs) per size and
dtype; the peak is the best over sizes. Sizes whose single matmul would take
longer than ``--max-seconds`` (predicted from the previous size) are skipped:
on CPUs without native bfloat16 kernels (no AVX512-BF16 / AMX) bfloat16 is a
slow fallback.
"""

from __future__ import annotations

import argparse

from benchlib import DTYPES, common_args, machine, matmul_peak, matmul_rate, print_table, resolve, write_json

# SmolLM2-135M's linear layers as (k, n): attention q/o, k/v, MLP gate/up, MLP down
STEP_SHAPES = {
    "576x576 (q, o)": (576, 576),
    "576x192 (k, v)": (576, 192),
    "576x1536 (gate, up)": (576, 1536),
    "1536x576 (down)": (1536, 576),
}


def measure_peaks(device, sizes=(512, 1024, 2048), repeats: int = 10, max_seconds: float = 5.0) -> dict:
    """Per dtype name: GFLOP/s per size (a string key; None where skipped) and ``peak``, the best."""
    out: dict[str, dict] = {}
    for name, dtype in DTYPES.items():
        per_size: dict[str, float | None] = {}
        predicted = 0.0
        for n in sorted(sizes):
            if predicted > max_seconds:
                per_size[str(n)] = None
                continue
            gflops, seconds = matmul_peak(dtype, device, n, repeats, budget_s=4 * max_seconds)
            per_size[str(n)] = gflops
            predicted = seconds * 8  # a matmul twice the size does 8x the work
        out[name] = {"gflops": per_size, "peak": max(v for v in per_size.values() if v is not None)}
    return out


def measure_step_shapes(device, tokens: int, repeats: int = 20) -> dict[str, dict[str, float]]:
    """Per dtype: GFLOP/s of (tokens x k) @ (k x n) for SmolLM2's layer shapes: what a training step's
    matmuls can reach at that many tokens per call, against the square-matmul peak."""
    return {
        name: {
            shape: matmul_rate(dtype, device, tokens, k, n, repeats, budget_s=5.0)[0]
            for shape, (k, n) in STEP_SHAPES.items()
        }
        for name, dtype in DTYPES.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=5.0)
    parser.add_argument(
        "--step-tokens",
        type=int,
        nargs="*",
        default=[],
        help="also time SmolLM2's layer shapes at these tokens per call (a batch of 8 ARC rows: ~250)",
    )
    common_args(parser, "peak")
    args = parser.parse_args()
    device = resolve(args.device)
    peaks = measure_peaks(device, args.sizes, args.repeats, args.max_seconds)
    sizes = sorted(args.sizes)
    print_table(
        ["dtype", *(f"n={n} GFLOP/s" for n in sizes), "peak GFLOP/s"],
        [[name, *(v["gflops"][str(n)] or "skipped" for n in sizes), v["peak"]] for name, v in peaks.items()],
    )
    shapes = {str(t): measure_step_shapes(device, t) for t in args.step_tokens}
    for tokens, per_dtype in shapes.items():
        print(f"\n{tokens} tokens per call, GFLOP/s (% of the dtype's square peak)")
        print_table(
            ["dtype", *STEP_SHAPES],
            [
                [name, *(f"{v:.0f} ({100 * v / peaks[name]['peak']:.0f}%)" for v in rates.values())]
                for name, rates in per_dtype.items()
            ],
        )
    write_json(args.out, {"machine": machine(device), "gflops": peaks, "step_shapes": shapes})


if __name__ == "__main__":
    main()
