"""scripts/gpu_check.py runs on the CPU at tiny sizes, so that the GPU check cannot rot between the
sessions that have a GPU."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import require_oracle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SECTIONS = ("1. Smoke", "2. Ours against diffusers", "3. Eager against compile_blocks()", "4. fp8 weights",
            "5. Block offload", "6. sample() peak", "7. from_pretrained", "8. load_parallel on one rank",
            "9. Streaming")


@pytest.mark.slow
@pytest.mark.reference
def test_the_gpu_check_runs_on_the_cpu_and_writes_every_section(tmp_path):
    require_oracle()  # the check compares with diffusers
    out = tmp_path / "GPU.md"
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--device", "cpu", "--small",
                           "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = out.read_text()
    for section in SECTIONS:
        assert f"## {section}" in report, section
    assert "## Failures\n\nnone" in report
    assert "0 failure(s)" in done.stdout


@pytest.mark.slow
def test_the_gpu_check_refuses_cuda_without_a_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py")], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and "--device cuda: no CUDA GPU here; use --device cpu --small" in done.stderr


# importing diffusers raises ImportError, as when the test extra is not installed; then the script runs as a script
WITHOUT_DIFFUSERS = (
    "import runpy, sys\n"
    "sys.modules['diffusers'] = None\n"
    "sys.argv = sys.argv[1:]\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@pytest.mark.slow
def test_without_diffusers_the_gpu_check_says_it_needs_the_test_extra(tmp_path):
    work, out = tmp_path / "work", tmp_path / "GPU.md"
    done = subprocess.run([sys.executable, "-c", WITHOUT_DIFFUSERS, os.path.join(ROOT, "scripts", "gpu_check.py"),
                           "--device", "cpu", "--small", "--out", str(out), "--workdir", str(work)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    assert done.stderr == ('gpu_check.py needs the test extra (diffusers, the oracle it compares with): '
                           'pip install -e ".[test]"\n')
    assert done.stdout == "" and not work.exists() and not out.exists()  # nothing done before the line


def test_an_unknown_section_is_one_line_naming_the_sections():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "gpu_check.py"), "--device", "cpu", "--small",
                           "--sections", "streaming,warp"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 2 and done.stdout == ""
    assert "--sections: warp; choose among smoke, parity, compile, fp8, offload, sample, load, parallel, streaming" \
        in done.stderr.splitlines()[-1]
