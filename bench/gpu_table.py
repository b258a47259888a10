"""The GPU run's main table (bench/gpu.py): its columns and one row of it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}

COLUMNS = (
    ("run", 22),
    ("dtype", 9),
    ("batch", 5),
    ("context", 7),
    ("ms/frame p50", 12),
    ("floor ms (x)", 13),
    ("frames/s", 8),
    ("real-time streams", 17),
    ("kernels/frame", 18),
    ("peak GiB", 8),
    ("notes", 0),
)


@dataclass
class Row:
    run: str
    dtype: str
    batch: int | str = "-"
    context: int | str = "-"
    ms: float | None = None
    floor: str = "-"
    frames_s: float | None = None
    realtime: str = "-"
    kernels: str = "-"
    peak: float | None = None
    notes: str = ""

    def cells(self) -> list[str]:
        num = lambda x, fmt: "-" if x is None else format(x, fmt)  # noqa: E731
        return [
            self.run,
            self.dtype,
            str(self.batch),
            str(self.context),
            num(self.ms, ".2f"),
            self.floor,
            num(self.frames_s, ".0f"),
            self.realtime,
            self.kernels,
            num(self.peak, ".1f"),
            self.notes,
        ]
