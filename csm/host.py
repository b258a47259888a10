"""Device to host: the one place where the serving path turns device tensors into numpy arrays.

A codec or the generator may run on CUDA while its callers want numpy (Ray serialises it cheaply). A
`.numpy()` on a CUDA tensor raises, and a `.cpu()` per stream is one blocking copy per stream; these
helpers copy a whole batch at once and work the same on any device.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def to_host(batch: Tensor) -> np.ndarray:
    """One copy of `batch` to host memory as numpy (waits for the device to finish computing it).

    Convert the dtype on the device first: it is cheaper there, and numpy has no bfloat16."""
    return batch.detach().cpu().numpy()


def to_host_each(parts: Sequence[Tensor]) -> list[np.ndarray]:
    """Tensors of one dtype and device, any shapes -> their numpy arrays, in one device-to-host copy
    (flattened and joined on the device, split on the host)."""
    if not parts:
        return []
    flat = to_host(torch.cat([p.reshape(-1) for p in parts]))
    ends = np.cumsum([p.numel() for p in parts])
    return [chunk.reshape(p.shape) for chunk, p in zip(np.split(flat, ends[:-1]), parts, strict=True)]
