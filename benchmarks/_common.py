"""Shared helpers of the benchmark scripts: interleaved timing, peak memory, machine and load lines."""

from __future__ import annotations

import ctypes
import os
import platform
import random
import statistics
import threading
import time
from typing import Callable, Dict, List

import torch


def machine_line() -> str:
    """One line naming the machine, torch, the threads and the current load (`uptime`)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("?",) * 3
    return (f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch "
            f"{torch.__version__}, threads={torch.get_num_threads()}, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f}")


def on_kernel_path(fn: Callable, path: str) -> Callable:
    """`fn` run with the sparse kernels of `path` (`hopformer.functional.set_kernel_path`, e.g.
    "reference" for the A/B rows), the default restored after each call."""
    from hopformer.functional import set_kernel_path

    def run(*args):
        set_kernel_path(path)
        try:
            return fn(*args)
        finally:
            set_kernel_path(None)

    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def add_stat_option(parser) -> None:
    """`--stat`, the statistic `interleaved` reports: "median", or "min" on machines whose noise only ever adds
    time (a shared VM: 512x512 matmuls read min 34.8, median 38.6, p90 52 ms in one run)."""
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="statistic of the timed rounds (min: for noisy shared machines)")


def interleaved(runs: Dict[str, Callable[[], None]], repeats: int, device: torch.device,
                warmup: int = 1, shuffle: bool = True, stat: str = "median") -> Dict[str, float]:
    """Median (or, with `stat="min"`, minimum) seconds of each run, measured round-robin (load changes hit
    every run alike).

    With `shuffle` (default) each round runs in a fresh order (seeded), so effects of the position in a
    round (e.g. running right after a run that freed a lot of memory) do not fall on the same run in
    every round: with a fixed order the sparsemax core at L = 4096 read 9-28% slower than the same
    arithmetic on the reference kernels (`separation.py --ab`); in a shuffled order they read the same."""
    times: Dict[str, List[float]] = {name: [] for name in runs}
    order = list(runs)
    rng = random.Random(0)
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    for _ in range(repeats):
        if shuffle:
            rng.shuffle(order)
        for name in order:
            fn = runs[name]
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    pick = min if stat == "min" else statistics.median
    return {name: pick(ts) for name, ts in times.items()}


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _libc_mallinfo2():
    try:
        fn = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _MallInfo2
    return fn


_MALLINFO2 = _libc_mallinfo2()


def _rss() -> int:
    """Bytes malloc has handed out now (glibc `mallinfo2`: arenas + mmapped blocks), else the RSS."""
    if _MALLINFO2 is not None:
        info = _MALLINFO2()
        return info.uordblks + info.hblkhd
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_bytes(fn: Callable[[], None], device: torch.device) -> int:
    """Peak memory of one call above what was allocated before it.

    CUDA: the caching allocator's peak. CPU: the bytes malloc has handed out (glibc `mallinfo2`),
    sampled every 0.1 ms by a watcher thread during the call (short peaks can be missed: a lower
    bound)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = _rss()
    peak = [base]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            time.sleep(0.0001)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(0, peak[0] - base)


def saved_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps for the backward of `forward()` (one count per storage)."""
    storages: Dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    out.sum().backward()
    return sum(storages.values())


class BusyLoop:
    """A competing process that spins on one core (the load of another user's job)."""

    def __init__(self, processes: int = 1):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_spin, daemon=True) for _ in range(processes)]

    def __enter__(self) -> "BusyLoop":
        for p in self.procs:
            p.start()
        time.sleep(0.5)  # let the spinner start
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.terminate()
            p.join()


def _spin() -> None:
    x = 0
    while True:
        x += 1
