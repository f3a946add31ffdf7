"""bench/gpu_check.sh: its no-GPU path (the one CI takes), and the checks it runs on a GPU, here on the CPU so
that the GPU script cannot rot between the rare runs on a device."""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from functools import cache
from pathlib import Path
from types import ModuleType

import pytest
import torch

from finer.testing import TINY_FAMILIES, unavailable_reason

#: Trains or generates with tiny models: seconds per test (`pytest -m 'not slow'` leaves them out).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


@cache
def _gpu_check() -> ModuleType:
    """bench/gpu_check.py as a module (bench/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_gpu_check", ROOT / "bench" / "gpu_check.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks itself up there
    spec.loader.exec_module(module)
    return module


def test_without_a_cuda_device_it_says_so_in_one_line_and_exits_0() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], result.stdout


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_the_lora_and_generation_check_runs_for_every_family(family: str) -> None:
    """What the script does per family on a GPU, in float32 on the CPU: LoRA steps on the registry's plan
    (language model only), then left-padded batched generation of exactly the asked number of tokens."""
    if reason := unavailable_reason(family):
        pytest.fail(reason)  # torchvision is a dependency: every family must run
    gpu_check = _gpu_check()
    row = gpu_check.check_family(
        family, device=torch.device("cpu"), dtype=torch.float32, steps=1, batch=2, new_tokens=2
    )
    assert row.family == family and row.check == "fp32 LoRA" and not row.note
    assert row.train_tokens_s > 0 and row.generate_tokens_s > 0
    assert math.isfinite(row.loss) and row.peak_mib is None  # no device memory on the CPU
    assert row.markdown().startswith(f"| {family} | fp32 LoRA | ")


def test_a_failing_check_becomes_a_row_and_the_others_still_run() -> None:
    gpu_check = _gpu_check()

    def broken() -> object:
        raise RuntimeError("CUDA error: out of memory\nsee above")

    row = gpu_check.guarded("gemma3", "bf16 LoRA", broken)
    assert row.note == "FAILED: CUDA error: out of memory see above"
    assert (
        row.markdown() == "| gemma3 | bf16 LoRA |  |  |  |  | FAILED: CUDA error: out of memory see above |"
    )
    assert gpu_check.HEADER.splitlines()[0].count("|") == row.markdown().count("|")


@pytest.mark.parametrize(
    ("module", "check"), [("bitsandbytes", "check_qlora"), ("liger_kernel", "check_liger")]
)
def test_optional_kernels_are_skipped_with_a_line_when_not_installed(module: str, check: str) -> None:
    if importlib.util.find_spec(module) is not None:
        pytest.skip(f"{module} is installed; the GPU run exercises it")
    row = getattr(_gpu_check(), check)(torch.device("cpu"), 1, 2)
    assert row.note.startswith(f"skipped: {module.replace('_', '-')} not installed")
