"""Timing shared by the benchmarks: contenders timed in interleaved rounds."""

from __future__ import annotations

import statistics
import time

import torch


def time_contenders(contenders: dict, x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per call of each contender, timed in interleaved rounds after two warm-ups."""
    times = {name: [] for name in contenders}
    for _ in range(2):
        for fn in contenders.values():
            fn(x)
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}
