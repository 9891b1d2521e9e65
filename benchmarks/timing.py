"""The one timer and memory probe of every benchmark: median step time, peak memory and working set.

On a CPU, memory is the process's resident set (RSS, from ``/proc/self/status``): the *working set* of a
configuration is the peak RSS during its steps minus the RSS just before the first one, which leaves out the
~0.8 GB of Python, torch and the model that dilutes ratios of total RSS. The peak is reset before the steps
(``/proc/self/clear_refs``), so model building does not count. RSS only follows live tensors if freed memory
goes back to the system: glibc keeps freed blocks below its *dynamic* mmap threshold in the heap, so the same
step measured 717 or 931 MB depending on allocation history. ``FIXED_MALLOC_ENV`` pins the threshold; the
benchmarks measure memory in a fresh process under it, and time in another one under the default allocator
(the pinned threshold makes reused memory fault its pages in again, which doubled a plain ResNet-18 step
here). On a GPU the same numbers come from torch's allocator (``max_memory_allocated`` against
``memory_allocated`` before the steps).
"""
from __future__ import annotations

import re
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

# Allocations of 64 KiB or more are mmapped and unmapped when freed (a fixed threshold also stops glibc
# from raising it as it sees large frees), so RSS tracks the tensors alive.
FIXED_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


@dataclass(frozen=True)
class StepCost:
    """One configuration's measured step: median time over the timed steps, and memory (MB)."""

    step_ms: float
    peak_mb: float  # peak RSS of the process (CPU) or peak allocated (GPU) during the steps
    working_set_mb: float  # that peak minus the memory in use just before the first step
    device: str

    def as_dict(self) -> dict:
        return {"step_ms": self.step_ms, "peak_mb": self.peak_mb, "working_set_mb": self.working_set_mb,
                "device": self.device}


def _proc_status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        return int(re.search(rf"{field}:\s+(\d+) kB", status.read()).group(1)) / 1024


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM, the peak RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def median_ms(step: Callable[[], None], *, steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time (ms) of ``steps`` calls after ``warmup`` untimed ones (synchronised on a GPU)."""
    return measure_step(step, steps=steps, warmup=warmup, device=device).step_ms


def measure_step(step: Callable[[], None], *, steps: int, warmup: int, device: torch.device) -> StepCost:
    """Time ``step`` and measure the memory it holds at its peak (module doc). Warm-up steps count for
    memory (the first step allocates the optimizer state and gradients) but not for time."""
    cuda = device.type == "cuda"

    def run():
        step()
        if cuda:
            torch.cuda.synchronize(device)

    if cuda:
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device) / 2 ** 20
        torch.cuda.reset_peak_memory_stats(device)
    else:
        before = _proc_status_mb("VmRSS")
        reset = _reset_peak_rss()
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    elif reset:
        peak = _proc_status_mb("VmHWM")
    else:  # no peak reset: the lifetime peak (model building included), an upper bound
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return StepCost(step_ms=1000 * statistics.median(times), peak_mb=peak, working_set_mb=peak - before,
                    device=str(device))
