"""Test configuration.

Triton kernels run on the CPU through Triton's interpreter. TRITON_INTERPRET must be set before triton is
first imported (bitsandbytes imports it), so it is set here, before any test module imports anything,
whenever no CUDA device is present.
"""
import os
import subprocess
import sys


def _cuda_present() -> bool:
    # Decide without importing torch or triton: a child process asks torch.
    if os.environ.get("COAP8BIT_TEST_CUDA") in ("0", "1"):
        return os.environ["COAP8BIT_TEST_CUDA"] == "1"
    try:
        out = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip().endswith("True")
    except Exception:
        return False


if not _cuda_present():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
