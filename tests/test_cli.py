"""`csm-demo generate` (what `make demo` runs) end to end: random weights, and real checkpoint loading."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

from csm.loading import load_model
from tests.checkpoints import write_llama3_tokenizer, write_sesame


def demo(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "csm.cli", "generate", "--streams", "2", "--frames", "4", *args]
    base = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "TOKENIZER_PATH")}
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, check=check, env={**base, **(env or {})}
    )


def test_demo_without_weights_says_so_and_reports_speed():
    out = demo("--preset", "tiny", "--streams", "3", "--frames", "5")
    assert "RANDOM WEIGHTS" in out.stderr
    assert len(re.findall(r"stream \d: 5 frames", out.stdout)) == 3
    total = re.search(r"total: 15 frames in [\d.]+ s = ([\d.]+) frames/s", out.stdout)
    assert total and float(total.group(1)) > 0


def test_demo_loads_a_transformers_checkpoint_with_its_tokenizer(hf_tiny_dir, tmp_path):
    path = tmp_path / "hf"
    shutil.copytree(hf_tiny_dir, path)
    write_llama3_tokenizer(path)
    out = demo("--model-path", str(path))
    assert "RANDOM WEIGHTS" not in out.stderr
    assert f"model: {path} (hf)" in out.stdout
    assert "total: 8 frames" in out.stdout


def test_demo_refuses_a_sesame_checkpoint_without_a_tokenizer(hf_tiny_dir, tmp_path):
    sesame = write_sesame(load_model(hf_tiny_dir).model, tmp_path / "sesame", "tiny-backbone", "tiny-decoder")
    out = demo("--model-path", str(sesame), check=False)
    assert out.returncode != 0 and "needs TOKENIZER_PATH" in out.stderr
    write_llama3_tokenizer(tmp_path)
    out = demo(env={"MODEL_PATH": str(sesame), "TOKENIZER_PATH": str(tmp_path)})
    assert f"model: {sesame} (sesame)" in out.stdout


def test_download_without_a_connection_fails_clearly(tmp_path):
    """`csm-demo download` is never run for real in tests (no internet); offline it must say why, not hang."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    cmd = [sys.executable, "-m", "csm.cli", "download", "--dir", str(tmp_path / "w")]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 1
    assert "could not download sesame/csm-1b" in out.stderr
