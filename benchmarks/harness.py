"""Timing helpers the benchmark scripts share (run them as ``python benchmarks/<script>.py``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def alternate(
    fns: dict[str, Callable[[], Any]], rounds: int, warmup: int, device: str
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Run every function ``warmup`` times, then ``rounds`` times each, alternating (order flips each round).

    Returns the wall-clock and the process CPU times of each run. On a shared CPU the CPU time is the
    steadier measure (other processes stretch wall time); on a GPU only wall time means anything.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    sync(device)
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fns[name]()
            sync(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu
