"""What a block of work costs in memory: its peak against what the process held when it began.

On Linux the kernel keeps each process's peak resident set (``VmHWM``) and resets it on request
(``5`` written to ``/proc/self/clear_refs``), so the CPU peak of a block is exact, not sampled;
where that is refused, the resident set is sampled every 10 ms. On CUDA the caching allocator's
peak statistics are reset before the block: tensors (allocated) and what the allocator holds
from the driver (reserved) are both kept; the reserved growth is beyond the free blocks the
process already held (its cache is not emptied: that would put allocations into timed runs).
A reset is process-wide: the windows open on the device keep their peak so far first, so a window
opened inside another (or in another thread) leaves the outer one's peak whole.
Weights and caches are counted apart, from their tensors (``tensor_bytes``), since a process
holding several models cannot tell them apart from its totals.
"""

from __future__ import annotations

import contextlib
import ctypes
import resource
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch


@dataclass
class MemoryWindow:
    """The memory of one block. CPU: resident bytes; CUDA: allocated bytes (reserved beside)."""

    device: str
    how: str = ""
    start_bytes: int = 0
    peak_bytes: int = 0
    start_reserved_bytes: int = 0  # CUDA only
    peak_reserved_bytes: int = 0

    @property
    def growth_bytes(self) -> int:
        """How far the block went above what was held when it began."""
        return max(0, self.peak_bytes - self.start_bytes)

    @property
    def reserved_growth_bytes(self) -> int:
        """How far the allocator's reserved bytes rose above their start (never below 0)."""
        return max(0, self.peak_reserved_bytes - self.start_reserved_bytes)


def rss_bytes() -> int:
    """This process's resident memory now."""
    return int(psutil.Process().memory_info().rss)


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB
    raise OSError(f"{field} not in /proc/self/status")


def _trim_heap() -> None:
    """Hand memory freed earlier back to the system (glibc's ``malloc_trim``), so what is
    resident is what is live and a block's peak counts all the memory it needs, not only what
    it could not take from earlier runs' freed pages. No-op without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# The process's peaks before a window reset them, by device ("cpu", "cuda:0"): resetting the
# kernel's VmHWM (and getrusage's ru_maxrss with it) or CUDA's peak statistics is process-wide.
_peaks_before: dict[str, int] = {}


def allocated_bytes(device: torch.device) -> int | None:
    """What the caching allocator has handed out on a CUDA ``device`` now; None elsewhere (a CPU
    process's resident set cannot be split between two models)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return int(torch.cuda.memory_allocated(device))


def held_bytes(device: torch.device) -> int:
    """What this process holds of ``device``'s memory now: its live tensors on CUDA (the caching
    allocator's free blocks can take a KV cache), its resident set elsewhere."""
    allocated = allocated_bytes(device)
    return rss_bytes() if allocated is None else allocated


def device_memory_bytes(device: torch.device) -> int:
    """All the memory of ``device``: the GPU's on CUDA, the machine's RAM otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[1])
    return int(psutil.virtual_memory().total)


def _indexed(device: torch.device) -> torch.device:
    """``device`` under the one name its peak is remembered by: with its index on CUDA (``cuda``
    is the current one, so ``cuda`` and ``cuda:0`` are one device), without one on CPU (the
    process's resident set, which ``_reset_peak_rss`` keeps under ``cpu``, whatever the index)."""
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def process_peak_bytes(device: torch.device | str) -> int:
    """This process's peak memory on ``device`` since it started, whatever windows reset since:
    the resident set on CPU, the caching allocator's allocated bytes on CUDA."""
    device = _indexed(torch.device(device))
    if device.type == "cuda":
        now_ = torch.cuda.max_memory_allocated(device)
    else:
        now_ = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return max(now_, _peaks_before.get(str(device), 0))


def _peaks_now(device: torch.device) -> tuple[int, int]:
    """The peaks since the last reset on ``device``: CUDA's allocated and reserved bytes; the
    kernel's peak resident set (VmHWM) on CPU, nothing reserved."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)
    return _status_bytes("VmHWM"), 0


def _keep_peaks(window: MemoryWindow, device: torch.device) -> None:
    """``window``'s peaks raised to those since the last reset."""
    peak, reserved = _peaks_now(device)
    window.peak_bytes = max(window.peak_bytes, peak)
    window.peak_reserved_bytes = max(window.peak_reserved_bytes, reserved)


# A reset is process-wide: each window open on a device (by name, as ``_peaks_before``) gets the
# peak so far before one is made, or a window opened inside another would wipe the outer's peak.
_windows_lock = threading.Lock()  # held from a reset (and its keeping) to the window's registering
_open_windows: dict[str, list[MemoryWindow]] = {}


def _before_reset(device: torch.device) -> None:
    """Keep the peaks a reset of ``device``'s is about to wipe: the process's (for
    ``process_peak_bytes``) and each open window's (the lock held)."""
    name = str(_indexed(device))
    _peaks_before[name] = process_peak_bytes(device)
    for window in _open_windows.get(name, []):
        _keep_peaks(window, device)


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak resident set to the current one (the peaks so far kept first);
    False where it is refused."""
    _trim_heap()
    _before_reset(torch.device("cpu"))
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_bytes("VmHWM")
    except OSError:
        return False
    return True


def _close(window: MemoryWindow, device: torch.device) -> None:
    """``window`` out of the open ones, its peaks filled in (also when its block raised)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    name = str(_indexed(device))
    with _windows_lock:
        _open_windows[name] = [
            w for w in _open_windows[name] if w is not window
        ]  # by identity: windows can be equal
        _keep_peaks(window, device)


@contextmanager
def memory_window(device: torch.device | str) -> Iterator[MemoryWindow]:
    """Inside: the block whose peak is measured; the window is complete when the block ends,
    also when it raised. Windows may be opened inside others, in any thread."""
    device = torch.device(device)
    name = str(_indexed(device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        # The cache is not emptied (the CPU window trims its heap): the bench times its runs inside
        # windows, and an empty cache would put the driver's allocations into each timed run.
        with _windows_lock:  # registered before another window can reset
            _before_reset(device)
            torch.cuda.reset_peak_memory_stats(device)
            window = MemoryWindow(
                "cuda", "CUDA caching allocator, peaks reset before the block",
                torch.cuda.memory_allocated(device), 0, torch.cuda.memory_reserved(device), 0,
            )  # fmt: skip
            _open_windows.setdefault(name, []).append(window)
        try:
            yield window
        finally:
            _close(window, device)
        return
    with _windows_lock:
        reset = _reset_peak_rss()
        if reset:
            window = MemoryWindow("cpu", "resident set, the kernel's peak (VmHWM) reset before the block")
            window.start_bytes = rss_bytes()
            _open_windows.setdefault(name, []).append(window)
    if reset:
        try:
            yield window
        finally:
            _close(window, device)
        return
    window = MemoryWindow("cpu", "resident set, sampled every 10 ms", rss_bytes(), rss_bytes())
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.01):
            window.peak_bytes = max(window.peak_bytes, rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield window
    finally:
        done.set()
        thread.join()
        window.peak_bytes = max(window.peak_bytes, rss_bytes())


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the given tensors' own storage (each storage counted once; meta tensors hold none)."""
    seen: dict[tuple[torch.device, int], int] = {}
    for t in tensors:
        # Meta tensors hold no memory, and every one of them reports data pointer 0.
        if t is not None and not t.is_meta:
            storage = t.untyped_storage()
            seen[(t.device, storage.data_ptr())] = storage.nbytes()
    return sum(seen.values())


def module_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes of the modules' parameters and buffers (shared tensors counted once)."""
    return tensor_bytes(t for m in modules for t in (*m.parameters(), *m.buffers()))


def graph_pool_bytes(device: torch.device | str) -> int:
    """CUDA: bytes the allocator holds in private pools (CUDA graphs' memory); 0 elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return 0
    index = _indexed(device).index
    return sum(
        int(seg["total_size"])
        for seg in torch.cuda.memory_snapshot()
        if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0) and seg.get("device") == index
    )
