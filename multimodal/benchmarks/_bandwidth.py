"""The memory-bandwidth floor of decoding, measured in the same run as the benchmark that quotes it.

A batch-1 decode step reads every weight once, so its speed limit is (read bandwidth) / (bytes read per token).
The bandwidth is that of the fastest of a few full reads (a sum) of a tensor far larger than any cache, on the
benchmark's own threads and device.
"""

from __future__ import annotations

import time

import torch


def read_bandwidth(device: str = "cpu", size_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second read by `tensor.sum()` over `size_bytes` of float32 (best of `repeats`)."""
    data = torch.ones(size_bytes // 4, device=device)  # [size_bytes / 4] float32
    data.sum()  # warm-up: page faults, thread pool
    best = float("inf")
    for _ in range(repeats):
        if data.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        data.sum().item()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best


def floor_columns(read_bytes: int, tokens_per_second: float, bandwidth: float) -> tuple[float, float]:
    """(GB/s the decode reads at, percent of the measured bandwidth) for one row of a table."""
    achieved = read_bytes * tokens_per_second
    return achieved / 1e9, 100 * achieved / bandwidth
