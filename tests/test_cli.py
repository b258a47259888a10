"""`csm-demo generate` (what `make demo` runs) works end to end on the random tiny preset."""

from __future__ import annotations

import re
import subprocess
import sys


def test_demo_generates_and_reports_speed():
    out = subprocess.run(
        [sys.executable, "-m", "csm.cli", "generate", "--preset", "tiny", "--streams", "3", "--frames", "5"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    assert "NO WEIGHTS GIVEN" in out.stderr
    assert len(re.findall(r"stream \d: 5 frames", out.stdout)) == 3
    total = re.search(r"total: 15 frames in [\d.]+ s = ([\d.]+) frames/s", out.stdout)
    assert total and float(total.group(1)) > 0
