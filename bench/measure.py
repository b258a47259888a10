"""Measuring a model on its device, for bench/engine.py and the GPU run (bench/gpu.py): device sync, peak
memory, the aten ops or CUDA kernels a call launches, and the memory-bandwidth floor of a frame.

Needs only torch (no Ray): the GPU machine imports it.
"""

from __future__ import annotations

import gc
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from csm.model import CSM


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bandwidth_floor_ms(model: CSM, device: torch.device) -> tuple[float, float, float]:
    """(GB read per frame at batch 1, measured copy GB/s, floor in ms)."""
    size = lambda m: sum(p.numel() * p.element_size() for p in m.parameters())  # noqa: E731
    n_dec = model.args.num_codebooks - 1
    per_frame = (
        size(model.backbone)
        + model.codebook0_head.weight.numel() * model.codebook0_head.weight.element_size()
        # The projection once (the backbone's output): later codebooks' inputs are rows of a projected table.
        + model.projection.weight.numel() * model.projection.weight.element_size()
        + n_dec * size(model.decoder)
        + model.audio_head.numel() * model.audio_head.element_size()
    )
    buf = torch.empty(256 * 2**20, dtype=torch.float32, device=device)  # 1 GiB
    dst = torch.empty_like(buf)
    for _ in range(3):
        dst.copy_(buf)
    sync(device)
    reps = 10
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(buf)
    sync(device)
    gbps = 2 * buf.numel() * 4 * reps / (time.perf_counter() - t0) / 1e9  # read + write
    return per_frame / 1e9, gbps, per_frame / 1e9 / gbps * 1000


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, by name; `views` counts those that only alias an input (no kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.views: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if func.is_view and _aliases(out, args):  # `to`, `reshape`, ... may alias or copy
            self.views[name] += 1
        return out


def _aliases(out, args) -> bool:
    storage = lambda t: t.untyped_storage()._cdata  # noqa: E731  (meta tensors have storages too)
    inputs = {storage(t) for t in args if isinstance(t, torch.Tensor)}
    outs = out if isinstance(out, (list, tuple)) else [out]
    return all(isinstance(o, torch.Tensor) and storage(o) in inputs for o in outs)


def count_kernels(fn: Callable[[], object], device: torch.device, per: str = "") -> str:
    """What one call of `fn` launches, labelled: CUDA kernels (torch.profiler traces the kernels inside a
    graph replay too), or on CPU the aten ops it dispatches."""
    if device.type != "cuda":
        with OpCounter() as counter:
            fn()
        return f"{counter.ops.total()} aten ops{per}"
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            sync(device)
    except RuntimeError as e:  # no CUPTI, or not allowed to use it: the row still counts
        return f"n/a ({type(e).__name__})"
    kernels = [
        e
        for e in prof.events()
        if e.device_type == DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))
    ]
    return f"{len(kernels)} CUDA kernels{per}" if kernels else "n/a (none traced)"


def init_profiler(device: torch.device) -> None:
    """Start (and stop) the CUDA profiler once before any graph is captured: profiling graphs captured
    before the profiler's first start has crashed or hung (pytorch/pytorch#75504), which would cost the
    whole lease."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]):
            torch.zeros(1, device=device).add_(1)
        sync(device)
