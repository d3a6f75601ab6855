"""Measurement: timed forward/backward iterations, peak memory, errors against the reference, machine facts."""

from __future__ import annotations

import ctypes
import functools
import gc
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.workload import Inputs, Problem, Reference

# Relative errors above these fail the benchmark's correctness check (loss, and the L2 norm of each gradient).
TOLERANCE = {"float32": 1e-3, "bfloat16": 3e-2, "float16": 1e-2}
L2_FLUSH_BYTES = 256 << 20
_PROC_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


# ---------------------------------------------------------------- memory


def _status_kib(key: str) -> int | None:
    try:
        for line in _PROC_STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Reset the kernel's resident-set high-water mark (Linux ≥ 4.0); False where that is not possible."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


class _RssSampler:
    """Fallback peak-RSS probe: polls psutil every millisecond in a thread (misses sub-millisecond peaks)."""

    def __init__(self) -> None:
        import psutil

        self._proc = psutil.Process()
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._proc.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self._proc.memory_info().rss)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, to make freed memory leave the process (else RSS baselines include cached free blocks)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: blocks >= 1 MiB are mmapped, and unmapped on free
    except (OSError, AttributeError):
        return None
    return libc


def trim_heap() -> None:
    """Give free heap memory back to the OS (glibc ``malloc_trim``); a no-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def current_rss() -> int | None:
    """Resident set size of this process in bytes."""
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    try:
        import psutil
    except ImportError:
        return None
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory growth over a block: CUDA ``max_memory_allocated`` above the start, or on the CPU the peak RSS
    above the start (kernel high-water mark, else a psutil sampler). ``growth`` is None where neither works."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.growth: int | None = None
        self._base: int | None = None
        self._sampler: _RssSampler | None = None
        self._hwm = False

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        trim_heap()
        self._base = current_rss()
        self._hwm = _reset_rss_peak()
        if not self._hwm and self._base is not None:
            try:
                self._sampler = _RssSampler()
            except ImportError:
                self._sampler = None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._base is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self._hwm:
            peak = (_status_kib("VmHWM") or 0) * 1024
        elif self._sampler is not None:
            peak = self._sampler.stop()
        else:
            return
        self.growth = max(0, peak - self._base)


# ---------------------------------------------------------------- time


class Stopwatch:
    """Time marks: ``perf_counter`` on the CPU, CUDA events on a GPU (read after one synchronisation)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def mark(self) -> object:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def ms(self, start: object, end: object) -> float:
        if self.cuda:
            end.synchronize()  # type: ignore[attr-defined]
            return float(start.elapsed_time(end))  # type: ignore[attr-defined]
        return (end - start) * 1e3  # type: ignore[operator]


@dataclass
class Samples:
    """Per-iteration forward, backward, forward+backward times (ms) and peak memory growth (bytes)."""

    fwd_ms: list[float] = field(default_factory=list)
    bwd_ms: list[float] = field(default_factory=list)
    total_ms: list[float] = field(default_factory=list)
    peak_bytes: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        med = lambda xs: statistics.median(xs) if xs else None
        return {
            "fwd_ms": med(self.fwd_ms),
            "bwd_ms": med(self.bwd_ms),
            "fwdbwd_ms": med(self.total_ms),
            "fwdbwd_ms_min": min(self.total_ms, default=None),
            "peak_bytes": max(self.peak_bytes, default=None),
            "samples": {"fwd_ms": self.fwd_ms, "bwd_ms": self.bwd_ms, "fwdbwd_ms": self.total_ms},
        }


def measure_iterations(
    loss_fn: Callable[[Inputs], Tensor],
    copies: list[Inputs],
    device: torch.device,
    *,
    warmup: int,
    repeats: int | None,
    budget_s: float = 2.0,
    on_first: Callable[[Tensor, Inputs], None] | None = None,
) -> Samples:
    """Run forward + backward ``warmup + repeats`` times, rotating over ``copies``; time and measure the last
    ``repeats`` (None: as many as fit ``budget_s`` at the last warm-up's speed, 3 to 25, or 1 when one iteration
    takes longer than the budget; at least 1 warm-up).
    Gradients are dropped before each iteration, so the peak includes producing them.
    ``on_first(loss, inputs)`` sees the first measured iteration's loss while its gradients are in place."""
    clock = Stopwatch(device)
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=device) if clock.cuda else None
    samples = Samples()
    if repeats is None:
        warmup = max(1, warmup)
    i, total = 0, warmup + (repeats or 0)
    while i < total:
        inputs = copies[i % len(copies)]
        inputs.zero_grad()
        if flush is not None:
            flush.zero_()
        with PeakMemory(device) as mem:
            t0 = clock.mark()
            loss = loss_fn(inputs)
            t1 = clock.mark()
            loss.backward()
            t2 = clock.mark()
        if i >= warmup:
            fwd, bwd = clock.ms(t0, t1), clock.ms(t1, t2)
            samples.fwd_ms.append(fwd)
            samples.bwd_ms.append(bwd)
            samples.total_ms.append(fwd + bwd)
            if mem.growth is not None:
                samples.peak_bytes.append(mem.growth)
            if i == warmup and on_first is not None:
                on_first(loss.detach(), inputs)
        elif i == warmup - 1 and repeats is None:
            last = clock.ms(t0, t2)
            fits = int(budget_s * 1e3 / max(last, 1e-3))
            total = warmup + max(1 if fits == 0 else 3, min(25, fits))
        del loss
        inputs.zero_grad()
        i += 1
    return samples


def rotation_copies(inputs: Inputs, device: torch.device, limit: int = 3) -> list[Inputs]:
    """Inputs to rotate between iterations: on CUDA up to ``limit`` copies while they take < 10% of the GPU."""
    if device.type != "cuda":
        return [inputs]
    size = inputs.hidden.nbytes + inputs.weight.nbytes + inputs.ref_weight.nbytes
    total = torch.cuda.get_device_properties(device).total_memory
    count = max(1, min(limit, int(0.1 * total // max(size, 1))))
    return [inputs] + [inputs.clone() for _ in range(count - 1)]


def matmul_peak(problem: Problem, repeats: int = 20) -> dict:
    """Throughput of one plain GEMM of the lm-head's shape in the problem's dtype, measured here and now."""
    device = problem.torch_device
    cuda = device.type == "cuda"
    m = min(problem.tokens, 8192 if cuda else 1024)
    n = min(problem.vocab, 16384 if cuda else 4096)
    k = problem.hidden
    a = torch.randn(m, k, device=device).to(problem.torch_dtype)
    b = torch.randn(n, k, device=device).to(problem.torch_dtype)
    clock = Stopwatch(device)
    times = []
    for i in range(repeats + 2):
        t0 = clock.mark()
        a @ b.T
        t1 = clock.mark()
        if i >= 2:
            times.append(clock.ms(t0, t1))
    ms = min(times)  # a peak: the best of the repeats
    return {"shape": [m, k, n], "dtype": problem.dtype, "ms": ms, "tflops": 2 * m * n * k / ms / 1e9}


# ---------------------------------------------------------------- errors


def _relative(value: Tensor, reference: Tensor) -> float:
    diff = (value.detach().double().cpu() - reference.double()).norm()
    return float(diff / reference.double().norm().clamp_min(1e-300))


def errors(loss: Tensor, inputs: Inputs, reference: Reference) -> dict[str, float]:
    """Relative errors of the loss and of ‖dH‖, ‖dW‖ (L2) against the reference; dW on the reference's rows."""
    if inputs.hidden.grad is None or inputs.weight.grad is None:
        raise RuntimeError("the provider produced no gradient for hidden or weight")
    grad_w = inputs.weight.grad
    if reference.weight_rows is not None:
        grad_w = grad_w.index_select(0, reference.weight_rows.to(grad_w.device))
    return {
        "loss": abs(float(loss) - reference.loss) / max(abs(reference.loss), 1e-300),
        "grad_hidden": _relative(inputs.hidden.grad, reference.grad_hidden),
        "grad_weight": _relative(grad_w, reference.grad_weight),
    }


def check(errs: dict[str, float] | None, dtype: str, exact: bool) -> str:
    """``ok``, ``approx`` (not checked: an approximate provider) or ``FAIL: …``."""
    if errs is None:
        return "FAIL: no errors measured"
    if not exact:
        return "approx"
    tol = TOLERANCE[dtype]
    bad = [f"{k} {v:.1e} > {tol:.0e}" for k, v in errs.items() if not v <= tol]
    return "FAIL: " + ", ".join(bad) if bad else "ok"


# ---------------------------------------------------------------- machine


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def _cpu_pressure() -> str | None:
    """The kernel's CPU pressure line (``some avg10=… avg60=…``): the share of time some runnable task waited for a
    CPU, i.e. what other tenants of the machine cost the measurement; None where it is not available."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, threads, load, memory, GPU, and the versions of everything measured."""
    info: dict = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_pressure": _cpu_pressure(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            name: _version(name)
            for name in ("torch", "triton", "sppo-kernels", "liger-kernel", "cut-cross-entropy", "numpy")
        },
        "git": _git_commit(),
        "triton_interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    try:
        import psutil

        info["memory_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["gpu_capability"] = f"{props.major}.{props.minor}"
        info["cuda"] = torch.version.cuda
    return info


def free_memory(device: torch.device) -> int:
    """Bytes the reference may use on ``device``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        import psutil

        return psutil.virtual_memory().available
    except ImportError:
        return 8 << 30
