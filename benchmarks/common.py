"""Helpers shared by the benchmark scripts: one timing helper, provenance
columns for every CSV row, and default result-file names.

    from common import default_csv, provenance, time_ms, write_rows
    t = time_ms(lambda: f(x), x.device)               # median ms of one call
    write_rows(path or default_csv("bench_attn", dev), rows, provenance(dev))

Timing (``time_ms``):
  - CUDA: CUDA events around each call on the current stream, after warm-up
    calls; before every timed call a buffer twice the size of the device's L2
    cache (256 MB when the size is unknown) is overwritten, so that no call
    finds the previous call's inputs or outputs in L2. The flush sits outside
    the events. The result is the median over the repeats. Without explicit
    counts, warm-up and repeats fill about ``warmup_ms`` and ``rep_ms`` of
    GPU time (like ``triton.testing.do_bench``, which the scripts used before).
  - CPU: ``time.perf_counter`` around each call after warm-up calls; median.

Provenance (``provenance``): commit (``git rev-parse --short HEAD`` of the
checkout these scripts sit in, ``+dirty`` when tracked files differ from it,
``unknown`` outside a git checkout), torch and CUDA versions, the GPU name or
CPU model, and the UTC date and time of the run.
"""
import csv
import datetime
import functools
import os
import platform
import re
import statistics
import subprocess
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

_FALLBACK_L2_BYTES = 128 << 20  # flush buffer of 2 x this (256 MB) when L2's size is unknown
_MAX_REPEATS = 2000


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _flush_buffer(index: int) -> torch.Tensor:
    """A byte buffer twice the size of device ``index``'s L2 cache (cached)."""
    l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or _FALLBACK_L2_BYTES
    return torch.empty(2 * int(l2), dtype=torch.uint8, device=torch.device("cuda", index))


def flush_l2(device) -> None:
    """Overwrite a buffer larger than L2 on ``device``'s current stream."""
    device = torch.device(device)
    _flush_buffer(device.index if device.index is not None else torch.cuda.current_device()).zero_()


def time_ms(fn, device="cuda", *, warmup=None, repeats=None, warmup_ms: float = 25.0, rep_ms: float = 100.0,
            flush: bool = True) -> float:
    """Median milliseconds of one call of ``fn()`` on ``device`` (see the module
    docstring). ``warmup``/``repeats`` fix the counts; on CUDA they default to
    what fills ``warmup_ms``/``rep_ms``, on the CPU to 1 and 5."""
    device = torch.device(device)
    if device.type != "cuda":
        return _time_cpu_ms(fn, 1 if warmup is None else warmup, 5 if repeats is None else repeats)
    with torch.cuda.device(device):
        return _time_cuda_ms(fn, device, warmup, repeats, warmup_ms, rep_ms, flush)


def _time_cpu_ms(fn, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _time_cuda_ms(fn, device, warmup, repeats, warmup_ms, rep_ms, flush) -> float:
    fn()  # first call: lazy initialization, compilation, allocator growth
    torch.cuda.synchronize(device)
    if warmup is None or repeats is None:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(5):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        estimate = max(start.elapsed_time(end) / 5, 1e-3)
        if warmup is None:
            warmup = max(1, min(_MAX_REPEATS, int(warmup_ms / estimate)))
        if repeats is None:
            repeats = max(1, min(_MAX_REPEATS, int(rep_ms / estimate)))
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(max(1, repeats))]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(max(1, repeats))]
    for s, e in zip(starts, ends):
        if flush:
            flush_l2(device)
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


# --------------------------------------------------------------------------
# Provenance
# --------------------------------------------------------------------------
def _git(*args) -> str:
    return subprocess.run(["git", "-C", HERE, *args], capture_output=True, text=True, timeout=30,
                          check=True).stdout.strip()


@functools.lru_cache(maxsize=None)
def git_commit() -> str:
    """Short commit of this checkout, "+dirty" when tracked files have changes,
    "unknown" when this is not a git checkout (or git is missing)."""
    try:
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "") if commit else "unknown"


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_name(device) -> str:
    """The GPU's name, or the CPU model for a CPU device."""
    device = torch.device(device)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()


@functools.lru_cache(maxsize=None)
def _run_started() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def provenance(device) -> dict:
    """Columns that say where a row comes from (appended to every CSV row)."""
    return dict(commit=git_commit(), torch_version=torch.__version__, cuda_version=torch.version.cuda or "none",
                device_name=device_name(device), date=_run_started().strftime("%Y-%m-%dT%H:%M:%SZ"))


# --------------------------------------------------------------------------
# Result files
# --------------------------------------------------------------------------
def slug(name: str) -> str:
    """A file-name-safe form of a device name ("NVIDIA H100 80GB HBM3" -> "NVIDIA_H100_80GB_HBM3")."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "unknown"


def default_csv(script: str, device) -> str:
    """results/<gpu-slug or cpu>/<script>_<YYYYMMDD>_<commit>.csv (date in UTC)."""
    device = torch.device(device)
    folder = slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    return os.path.join(RESULTS, folder, f"{script}_{_run_started():%Y%m%d}_{slug(git_commit().replace('+', '-'))}.csv")


def write_rows(path: str, rows, extra=None) -> None:
    """Writes a list of dicts as CSV (header from the first row), creating folders;
    ``extra`` (e.g. ``provenance(device)``) is appended to every row."""
    if extra:
        rows = [{**r, **extra} for r in rows]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"rows written to {path}")
