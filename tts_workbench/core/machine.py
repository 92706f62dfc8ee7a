"""The machine and versions a result ran on (``environment``), recorded with every result, and
the warning a report gives where the machine was shared while it ran."""

from __future__ import annotations

import os
import platform
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import torch

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
