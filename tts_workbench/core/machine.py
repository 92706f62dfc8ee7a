"""The machine and versions a result ran on (``environment``), recorded with every result, its
memory read bandwidth (``read_bandwidth``), and the warnings a report gives where the machine was
shared or ran slower while it ran."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Sequence
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import torch
from torch.utils.benchmark import Timer

# Below this share of a run's best read bandwidth, a probe says the machine ran slower (a slow spell).
SLOW_SPELL = 0.7

# The CPU features half-precision results depend on: an AVX2 CPU has no bfloat16 arithmetic (its
# matmuls convert on the fly), AVX512-BF16 and AMX do. This project's CPU machine has been each.
ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_features() -> tuple[str, list[str]]:
    """The CPU's model name and which of ``ISA_FLAGS`` it has, from Linux's /proc/cpuinfo
    (elsewhere ``platform.processor()`` and no flags)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine(), []
    fields = {}  # the last CPU's (every CPU lists the same model and flags)
    for line in info.splitlines():
        key, colon, value = line.partition(":")
        if colon:
            fields[key.strip()] = value.strip()
    have = set(fields.get("flags", "").split())
    return fields.get("model name", platform.machine()), [f for f in ISA_FLAGS if f in have]


def environment(model: str, device: str) -> dict[str, Any]:
    """Machine and versions, recorded with every result: the CPU by name, its half-precision
    features and the instruction set torch's CPU kernels use (``cpu_capability``)."""
    cpu, flags = cpu_features()
    env = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_count": psutil.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # runnable processes, averaged over the last minute: above the CPUs, others shared them
        "load_average_1m": round(os.getloadavg()[0], 2),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": version("transformers"),
        "chatterbox-tts": version("chatterbox-tts"),
        "device": device,
        "model": model,
    }
    if device.startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def busy_machine_line(env: dict[str, Any], stages: int = 1) -> list[str]:
    """A warning where the machine was shared while it ran: a one-minute load average past what
    the run itself keeps busy (``stages`` threads working at once, each with its torch threads)
    by more than half the CPUs. On 2 cores a second job made T3's step 25-50 times slower
    (2026-12-07): ratios from one run still hold, absolute times do not. Nothing for a report
    without the figure (before 2026-12-07). The bench runs one stage (2 threads, 2 CPUs: warned
    past 3.0), the load study two at once (T3's and S3Gen's: past 5.0)."""
    load, cpus = env.get("load_average_1m"), env.get("cpu_count")
    if load is None or not cpus or load <= stages * env.get("torch_threads", cpus) + cpus / 2:
        return []
    return [f"the machine was busy: load average {load:.1f} on {cpus} CPUs as the run ended: absolute "
            "times are inflated; compare the ratios of one run, or run again on an idle machine"]  # fmt: skip


def read_bandwidth(device: str = "cpu", mbytes: int = 512, min_run_time_s: float = 1.0) -> float:
    """Memory read bandwidth in bytes/s, measured with a reduction over a buffer larger than cache."""
    x = torch.ones(mbytes * 2**20 // 4, device=device)
    # On the threads the decode steps run on: Timer's default is one, on a CPU one core's bandwidth.
    timer = Timer("x.sum()", globals={"x": x}, num_threads=torch.get_num_threads())
    t = timer.blocked_autorange(min_run_time=min_run_time_s)
    read = x.numel() * 4 / t.median
    del x, timer
    if torch.device(device).type == "cuda":
        # The buffer back to the device: left in the caching allocator, every run's large
        # allocations were carved from it and its reserved growth showed only the small pool's
        # (before 2026-12-07; the H200's upstream run: 0.02 GiB reserved against 0.15 GiB grown).
        torch.cuda.empty_cache()
    return read


def slow_spell_line(probes: Sequence[tuple[str, float | None]]) -> list[str]:
    """A warning where one of a run's bandwidth probes (``read_bandwidth``: when it was taken, GB/s)
    fell below ``SLOW_SPELL`` of the run's best. On 2026-12-07 the whole host ran ~4 times slower
    for minutes (T3's step 23 ms, not 5.5) while the load average showed nothing, and the probe read
    7.5-9.6 GB/s against 18.6-20.0: what was measured then is slower for that alone. Nothing with
    fewer than two probes, or with a missing one (reports before late 2026-12-07)."""
    known = [(at, gb_s) for at, gb_s in probes if gb_s is not None]
    if len(known) < max(2, len(probes)):
        return []
    best_at, best = max(known, key=lambda p: p[1])
    slow = [f"{gb_s:.1f} GB/s {at}" for at, gb_s in known if gb_s < SLOW_SPELL * best]
    if not slow:
        return []
    return [f"the machine ran slower during the run: memory read bandwidth {', '.join(slow)}, against "
            f"{best:.1f} GB/s {best_at} (a slow spell of the host; the load average does not show one): "
            "what ran then is slower for that alone; run again"]  # fmt: skip
