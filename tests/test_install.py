"""The install picks a torch build by architecture, and no device install path names a CUDA package."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CUDA = re.compile(r"nvidia-|cuda-toolkit|\bcu1\d\d\b|\+cu\d|triton", re.IGNORECASE)


def _constraints_for(arch: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ROOT / "scripts" / "constraints-file"), arch], capture_output=True, text=True,
                          timeout=30)


@pytest.mark.parametrize(("arch", "name", "torch"), [("x86_64", "constraints.txt", "torch==2.13.0"),
                                                     ("aarch64", "constraints-aarch64.txt", "torch==2.10.0"),
                                                     ("arm64", "constraints-aarch64.txt", "torch==2.10.0")])
def test_the_constraints_follow_the_architecture(arch, name, torch):
    chosen = _constraints_for(arch)
    assert chosen.returncode == 0, chosen.stderr
    path = Path(chosen.stdout.strip())
    assert path.name == name
    pins = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert torch in pins and "flwr==1.42.0" in pins


def test_an_architecture_without_a_tested_torch_is_refused():
    refused = _constraints_for("armv7l")
    assert refused.returncode == 2 and "no tested torch pin for architecture armv7l" in refused.stderr


def test_no_device_install_path_names_a_cuda_package_or_an_unverified_index():
    pins = [line for line in (ROOT / "constraints-aarch64.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert not [line for line in pins if CUDA.search(line)], pins
    dockerfile = (ROOT / "deploy" / "containers" / "client-arm64.Dockerfile").read_text()
    guide = (ROOT / "deploy" / "raspberry-pi.md").read_text()
    commands = [line for line in dockerfile.splitlines() if line.startswith(("RUN", " &&"))]
    commands += [line for block in re.findall(r"```bash\n(.*?)```", guide, re.S) for line in block.splitlines()]
    assert any("scripts/install client" in line for line in commands)
    for line in commands:
        assert not CUDA.search(line) and "download.pytorch.org" not in line, line
        assert not re.search(r"pip install[^#]*\btorch\b", line), f"installs torch without the pins: {line}"
    # PyTorch's own index appears only where it is said to be unverified.
    for paragraph in guide.split("\n\n"):
        if "download.pytorch.org" in paragraph:
            assert "unverified" in paragraph, paragraph
