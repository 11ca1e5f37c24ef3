"""Where latency is measured: a registry of backends, each with its clock and machine facts.

A backend names a runtime and a device ("torch-cpu"). Its clock times a region: wall time
around a synchronous CPU call, CUDA events for asynchronous GPU work. Imports in this package go one way, from the stage below to the one above:
table -> cost -> backends -> runtime, graphrun -> onnxrt -> measure -> validate -> commands.

Adding a backend
(the Triton kernels of a later issue) registers one more `Backend`; the
table format does not change, since a table only records the backend's name and its
machine facts in the fingerprint.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass, field

import torch

from ..errors import ProfileError


class CpuClock:
    """Wall time; right for synchronous CPU execution."""

    def mark(self):
        return time.perf_counter_ns()

    def sync(self) -> None:
        pass

    @staticmethod
    def ms(start, end) -> float:
        return (end - start) / 1e6


class CudaClock:
    """CUDA events: marks are queued with the kernels; `sync` before reading them."""

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        torch.cuda.synchronize()

    @staticmethod
    def ms(start, end) -> float:
        return start.elapsed_time(end)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_machine(threads: int) -> dict:
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "arch": platform.machine(),
            "torch": torch.__version__, "threads": threads}


def cuda_machine(threads: int) -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda, "torch": torch.__version__, "cpu": _cpu_model(),
            "threads": threads}


@dataclass(frozen=True)
class Backend:
    """A runtime + device to measure on. `available()` says why not, or returns None."""

    name: str
    device: str
    clock: type
    machine_facts: object  # callable(threads) -> dict
    needs: object = None  # callable() -> None or a reason it cannot run here
    notes: str = field(default="")
    runtime: str = "torch"  # "torch": eager modules; "onnxruntime": exported sub-networks
    dtypes: tuple = ("float32", "bfloat16", "float16")

    def machine(self, threads: int) -> dict:
        return self.machine_facts(threads)

    def unavailable(self) -> str | None:
        return self.needs() if self.needs else None


BACKENDS: dict[str, Backend] = {}


def ort_available() -> str | None:
    """None when onnxruntime and the exporter's onnxscript import, else what to install."""
    missing = []
    for mod in ("onnx", "onnxruntime", "onnxscript"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        return (f"{', '.join(missing)} not installed; pip install 'flextron_fx[onnx]' "
                "(onnx, onnxruntime, onnxscript)")
    return None


def ort_machine(threads: int) -> dict:
    import onnxruntime

    return dict(cpu_machine(threads), onnxruntime=onnxruntime.__version__)

# named in the issue, not measured yet: said in the error so users know they are planned
PLANNED = {
    "triton": "a model lowered to the Triton kernels (flextron_fx.passes.lower) is not "
              "profiled yet; benchmarks/codegen_gpu.py times the kernels",
}


def register(backend: Backend) -> Backend:
    BACKENDS[backend.name] = backend
    return backend


register(Backend("torch-cpu", "cpu", CpuClock, cpu_machine,
                 notes="PyTorch eager on the CPU; wall time"))
register(Backend("torch-cuda", "cuda", CudaClock, cuda_machine,
                 needs=lambda: None if torch.cuda.is_available() else
                 "torch sees no CUDA device on this machine",
                 notes="PyTorch eager on GPU 0; CUDA events"))

register(Backend("onnxruntime-cpu", "cpu", CpuClock, ort_machine, needs=ort_available,
                 notes="sub-networks exported to ONNX, onnxruntime's CPU provider; wall time, "
                       "per-op times from onnxruntime's profiler",
                 runtime="onnxruntime", dtypes=("float32",)))


def get_backend(name: str) -> Backend:
    """The registered backend `name`, usable on this machine, or a ProfileError saying why."""
    if name not in BACKENDS:
        planned = f" ({PLANNED[name]})" if name in PLANNED else ""
        raise ProfileError(f"backend {name!r} is not available{planned}; measured backends: "
                           f"{sorted(BACKENDS)}")
    backend = BACKENDS[name]
    why = backend.unavailable()
    if why:
        raise ProfileError(f"backend {name!r} cannot run here: {why}; use "
                           f"{[b for b in BACKENDS if not BACKENDS[b].unavailable()]}")
    return backend
