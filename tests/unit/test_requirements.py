"""The images' Python requirement sets (deploy/requirements/), as the Dockerfile, scripts/setup.sh
and CI share them.

- Every line is an exact pin; the two images agree on torch and on the ONNX Runtime release;
  TensorRT's three packages move together, within what the TensorRT backend supports; nothing
  in pyproject.toml pins an ONNX Runtime build (the CPU and CUDA builds cannot coexist).
- The Dockerfile installs exactly these files, and its CUDA target fails to build without
  TensorRT or ONNX Runtime's CUDA provider.
- CI's venv *is* the CPU set plus the mixed-FP16 converter (scripts/setup.sh installs the same
  files): every pin is the installed version and its modules import.
- Slow and ``network``: a fresh venv installs the CPU image's whole runtime exactly as the
  Dockerfile does (the set, then the project) and imports the server; the CUDA set's
  pure-Python part (the converter) installs and imports there too, and its CUDA-only pins
  (onnxruntime-gpu, TensorRT) exist on the package index. ~2 minutes.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from forgedit.backends.tensorrt_backend import SUPPORTED_VERSIONS

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "deploy" / "requirements"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;#]*)$")
# distribution -> a module it must make importable
MODULES = {
    "torch": "torch",
    "onnxruntime": "onnxruntime",
    "nvidia-modelopt": "modelopt.onnx.autocast",
    "onnx-graphsurgeon": "onnx_graphsurgeon",
    "polygraphy": "polygraphy",
    "onnxslim": "onnxslim",
    "onnxscript": "onnxscript",
    "onnx-ir": "onnx_ir",
    "lief": "lief",
    "nvidia-ml-py": "pynvml",
}


def pins(name: str) -> dict[str, str]:
    """distribution -> version of one requirement file, ``-r`` includes followed; any line
    that is not an exact pin fails."""
    result: dict[str, str] = {}
    for raw in (REQUIREMENTS / name).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            result.update(pins(line.removeprefix("-r ").strip()))
            continue
        match = PIN.match(line)
        assert match, f"{name}: {raw!r} is not an exact pin (name==version)"
        result[match[1].lower()] = match[2]
    return result


def test_every_requirement_is_an_exact_pin_and_the_images_agree() -> None:
    cpu, cuda, fp16 = pins("cpu.txt"), pins("cuda.txt"), pins("fp16.txt")
    assert cpu["torch"] == cuda["torch"] == "2.13.0"
    assert cpu["onnxruntime"] == cuda["onnxruntime-gpu"]
    assert "onnxruntime" not in cuda and "onnxruntime-gpu" not in cpu
    assert fp16.items() <= cuda.items()  # the converter ships in the CUDA image
    trt = {k: v for k, v in cuda.items() if k.startswith("tensorrt")}
    assert set(trt) == {"tensorrt-cu12", "tensorrt-cu12-bindings", "tensorrt-cu12-libs"}
    (version,) = set(trt.values())
    low, high = SUPPORTED_VERSIONS
    major, minor = (int(x) for x in version.split(".")[:2])
    assert low <= (major, minor) < high, f"TensorRT {version} is outside {SUPPORTED_VERSIONS}"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert not re.search(r'"onnxruntime(-gpu)?[=<>~]', pyproject)


def test_the_dockerfile_installs_these_sets_and_refuses_an_image_without_its_runtime() -> None:
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    assert "COPY deploy/requirements ./deploy/requirements" in dockerfile
    for target, name in (("cuda", "cuda.txt"), ("cpu", "cpu.txt")):
        stage = dockerfile.split(f"AS {target}-install", 1)[1].split("\nFROM ", 1)[0]
        assert f"-c deploy/requirements/{name} torch" in stage
        assert f"pip install -r deploy/requirements/{name}" in stage
        assert "pip install . && pip check" in stage
    cuda_stage = dockerfile.split("AS cuda-install", 1)[1].split("\nFROM ", 1)[0]
    assert "import onnxruntime, tensorrt" in cuda_stage
    assert "'CUDAExecutionProvider' in providers" in cuda_stage
    assert "tensorrt_profile(tensorrt" in cuda_stage  # a TensorRT forgedit supports


def test_this_venv_is_the_cpu_set_plus_the_fp16_converter() -> None:
    """scripts/setup.sh installs deploy/requirements/cpu.txt and fp16.txt: each pin is what is
    installed and its module imports (torch's local build label aside)."""
    for name, version in {**pins("cpu.txt"), **pins("fp16.txt")}.items():
        installed = importlib.metadata.version(name)
        assert installed.split("+")[0] == version, f"{name} {installed} installed, {version} pinned"
        importlib.import_module(MODULES[name])


@pytest.mark.slow
@pytest.mark.network
def test_a_fresh_venv_installs_the_cpu_image_runtime_and_the_cuda_sets_pure_python_part(
    tmp_path: Path,
) -> None:
    source = tmp_path / "src"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", ".tools", "build", "*.egg-info", "__pycache__", "clients", "tests"
        ),
    )
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")

    def pip(*args: str) -> str:
        done = subprocess.run(
            [python, "-m", "pip", "--disable-pip-version-check", *args],
            cwd=source,
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    # As deploy/Dockerfile's cpu target (torch from this machine's index instead of PyTorch's).
    pip("install", "--quiet", "-c", "deploy/requirements/cpu.txt", "torch")
    pip("install", "--quiet", "-r", "deploy/requirements/cpu.txt")
    pip("install", "--quiet", ".")
    pip("check")
    probe = (
        "import onnxruntime, torch, server.main, registry, forgedit.engine; "
        "import forgedit.backends.onnxruntime_backend; "
        "print(torch.__version__, 'CPUExecutionProvider' in onnxruntime.get_available_providers())"
    )
    done = subprocess.run([python, "-c", probe], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[1] == "True"
    # The CUDA set: its pure-Python part installs and imports next to the CPU runtime ...
    pip("install", "--quiet", "-r", "deploy/requirements/fp16.txt")
    pip("check")
    done = subprocess.run(
        [python, "-c", "import modelopt.onnx.autocast"], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    # ... and its CUDA-only pins exist on the index (installing them needs NVIDIA's index or
    # a GPU image: TensorRT's wheels download from NVIDIA at install time).
    cuda_only = {
        k: v for k, v in pins("cuda.txt").items() if k not in pins("fp16.txt") and k != "torch"
    }
    for name, version in cuda_only.items():
        listed = pip("index", "versions", name)
        assert re.search(rf"\b{re.escape(version)}\b", listed), f"{name}=={version} not listed"
