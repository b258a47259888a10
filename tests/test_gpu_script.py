"""`bench/gpu.sh` in dry-run mode: the GPU driver's every section, on CPU at tiny sizes, so the script that
runs once per GPU lease cannot rot between leases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run_dry() -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPU_DRY_RUN": "1", "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", "bench/gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=330
    )


def _table_rows(lines: list[str], header_start: str) -> list[list[str]]:
    """The cells of each row of the markdown table whose header line starts with `header_start`."""
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("| "):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_gpu_script_dry_run_prints_every_table():
    out = _run_dry()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    lines = out.stdout.splitlines()
    assert any(line.startswith("# floor") for line in lines)

    header = next(line for line in lines if line.startswith("| run "))
    columns = ("ms/frame p50", "floor ms (x)", "frames/s", "real-time streams", "kernels/frame", "peak GiB")
    assert all(column in header for column in columns)
    rows = _table_rows(lines, "| run ")
    assert all(len(r) == 11 for r in rows)
    assert not [r for r in rows if "FAILED" in r[-1] or "SKIPPED" in r[-1]], rows
    cells = {(r[0], r[2], r[3]) for r in rows}
    for run in ("engine bf16 graphs", "engine fp16 (T4 shape)"):
        for batch in ("1", "2"):
            for context in ("200", "1800"):  # a long context, near csm-1b's 2048 positions
                assert (run, batch, context) in cells
    batch1 = [r for r in rows if r[0].startswith("engine") and r[2] == "1"]
    assert all(r[5] != "-" and "(x" in r[5] for r in batch1)  # beside the bandwidth floor
    assert all("aten ops" in r[8] for r in rows if r[0].startswith("engine"))  # CPU: ops, labelled
    e2e = next(r for r in rows if r[0] == "e2e prompt->PCM")
    assert "int16 PCM on host" in e2e[-1]
    mimi = [r for r in rows if r[0] == "mimi fp32 decode"]
    assert [r[2] for r in mimi] == ["1", "2"] and all(r[1] == "fp32" for r in mimi)
    assert "max rel err" in mimi[0][-1]

    chat = _table_rows(lines, "| reuse ")
    assert {r[0] for r in chat} == {"on", "off"}
    assert all(int(r[2]) > 1 for r in chat)  # several turns each
    on, off = (next(r for r in chat if r[0] == mode and r[1] == "2") for mode in ("on", "off"))
    assert int(on[4]) < int(off[4])  # reuse prefills fewer rows per reply
    assert any(line.startswith("conversations per GPU with every reply faster") for line in lines)
