"""Which dtype a run computes in: float32 (the default), bfloat16, or ``auto``.

``bfloat16`` stores the frozen weights in bfloat16 and runs every matmul in it;
whatever is trained (the auxiliary model, SFPrompt's tail, the fine-tuned
model) is updated through float32 master weights kept by the optimiser
(:class:`fedsp.methods.optim.Phase`), so small updates are not lost to
bfloat16's 8-bit mantissa. The prefix itself is always float32.

``auto`` picks bfloat16 only where the hardware multiplies bfloat16 natively:
a CPU with AMX-BF16 or AVX512-BF16 instructions, or a CUDA GPU that supports
it; everywhere else float32. Without native kernels torch falls back to a
scalar bfloat16 path, measured 6-27x *slower* than float32 on an AVX2 CPU.
With AMX it was 1.2-1.9x faster per training step and 2.2x faster in
evaluation, with the same evaluation accuracy; FedSP trained in bfloat16 ended
0.6 points lower in acc (0.1 higher in acc_norm) over 3 seeds: within seed
noise, but more than the 0.5 points a speed-up may cost here, so float32 stays
the default (docs/performance.md, section 7).
"""

from __future__ import annotations

import functools
from pathlib import Path

from fedsp.errors import FedSPError

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def cpu_info(cpuinfo: str = "/proc/cpuinfo") -> dict[str, str]:
    """The first processor's fields of Linux ``/proc/cpuinfo`` (``model name``, ``flags``...); empty
    elsewhere."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> frozenset[str]:
    """The instruction-set flags of this machine's CPU (empty where unknown)."""
    return frozenset(cpu_info(cpuinfo).get("flags", "").split())


def native_bfloat16(device: str = "cpu", flags: frozenset[str] | None = None) -> bool:
    """Whether ``device`` (``cpu`` or ``cuda``) multiplies bfloat16 natively."""
    if device == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    flags = cpu_flags() if flags is None else flags
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def resolve_dtype(dtype: str, device: str = "auto") -> str:
    """``float32`` / ``bfloat16`` as given; ``auto``: bfloat16 where native on the device the run uses."""
    if dtype != "auto":
        return dtype
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return "bfloat16" if native_bfloat16(device) else "float32"


ATTENTION_CHOICES = ("auto", "sdpa", "eager")


def pick_attention(attention: str, dtype: str, device_type: str) -> str:
    """The attention kernel: ``auto`` is ``eager`` for bfloat16 on a CPU, else ``sdpa``.

    On the CPU, torch's fused (flash) attention backward in bfloat16 took 18% of a
    FedSP client round on SmolLM2, about 4x its float32 time; the eager kernel
    (matmuls, softmax in float32) made the round 13% faster there and changed
    nothing in float32 (docs/performance.md).
    """
    if attention not in ATTENTION_CHOICES:
        raise FedSPError(
            f"attention {attention!r} is not supported; choose one of: {', '.join(ATTENTION_CHOICES)}"
        )
    if attention != "auto":
        return attention
    return "eager" if dtype == "bfloat16" and device_type == "cpu" else "sdpa"
