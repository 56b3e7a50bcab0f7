"""The repo's kernels/ folder (shipped as coap8bit.kernels) must not shadow Hugging Face's ``kernels`` from a
source checkout: with the repo root as working directory and on sys.path (``python -c``, ``python -m
pytest``), transformers must import, and our kernels must not load as a top-level ``kernels``."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.slow
def test_transformers_trainer_imports_from_the_repo_root():
    out = _run("from transformers import Trainer; print('ok')")
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_our_kernels_never_load_as_a_top_level_package():
    out = _run("try:\n    import kernels.quant\n    print('loaded')\nexcept ImportError:\n    print('refused')\n")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "refused"  # relative imports beyond the top level: none of our code runs
    out = _run("import coap8bit.kernels.quant as q; print(q.__name__)")
    assert out.returncode == 0 and out.stdout.strip() == "coap8bit.kernels.quant", out.stderr[-2000:]
