"""The fused CUDA attention kernels (emu/models/csrc/flash_attention.cu): they must compile wherever nvcc is
installed, GPU or not, so a broken kernel is caught on any machine; with a GPU, the standalone build's
forward and backward must also agree with its CPU reference."""
import os
import shutil
import subprocess

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "emu", "models", "csrc", "flash_attention.cu")
NVCC = shutil.which("nvcc")

pytestmark = [pytest.mark.skipif(NVCC is None, reason="nvcc is not installed"), pytest.mark.slow]


def nvcc(*flags, out):
    proc = subprocess.run([NVCC, "-O3", "-std=c++17", "-arch=sm_90", *flags, SOURCE, "-o", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "warning" not in proc.stderr.lower(), proc.stderr[-3000:]
    return out


def test_the_kernel_compiles_as_a_library_object_with_both_launchers(tmp_path):
    obj = nvcc("-c", out=tmp_path / "flash_attention.o").read_bytes()
    # extern "C": the binding (flash_attention.cpp) links against these unmangled names
    assert b"emu_flash_attention_forward" in obj and b"emu_flash_attention_backward" in obj


def test_the_standalone_build_compiles_and_matches_its_cpu_reference_on_a_gpu(tmp_path):
    binary = nvcc("-DEMU_ATTENTION_STANDALONE", out=tmp_path / "attention")
    if not torch.cuda.is_available():
        pytest.skip("built; no CUDA GPU to run it on")
    proc = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stdout + proc.stderr
    assert proc.stdout.count(" dq ") == 3, proc.stdout  # the gradients were checked, for each of three shapes
