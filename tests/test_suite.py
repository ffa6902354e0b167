"""The test suite's own promises: without the oracle (or the browser driver) its tests skip locally, and fail in CI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # pytest inside pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WITHOUT = (
    "import sys\n"
    "sys.modules[sys.argv.pop(1)] = None  # importing it raises ImportError, as when it is not installed\n"
    "import pytest\n"
    "sys.exit(pytest.main(sys.argv[1:]))\n"
)


def run_reference_tests_without_diffusers(ci: bool, *extra: str, package: str = "diffusers") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    return subprocess.run([sys.executable, "-c", WITHOUT, package, "-q", "-m", "reference", "-p", "no:cacheprovider",
                           *extra, "tests"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_without_diffusers_the_reference_tests_skip_locally():
    run = run_reference_tests_without_diffusers(ci=False)
    summary = run.stdout.strip().splitlines()[-1]
    assert run.returncode == 0, run.stdout[-3000:]
    assert " skipped" in summary and "failed" not in summary and "error" not in summary, summary


def test_without_diffusers_ci_fails_instead_of_skipping():
    run = run_reference_tests_without_diffusers(True, "-x", "tests/test_parity.py")
    assert run.returncode == 1 and "the parity oracle diffusers (pinned in setup.cfg's test extra) must be installed in CI" \
        in run.stdout


def test_without_peft_ci_fails_the_lora_parity_tests():
    run = run_reference_tests_without_diffusers(True, "-x", "tests/test_lora.py", package="peft")
    assert run.returncode == 1 and "the parity oracle peft (pinned in setup.cfg's test extra) must be installed in CI" \
        in run.stdout


@pytest.mark.timeout(600)
@pytest.mark.parametrize("ci", [False, True], ids=["locally", "in CI"])
def test_without_playwright_the_browser_tests_skip_locally_and_fail_in_ci(ci):
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci:
        env["CI"] = "true"
    run = subprocess.run([sys.executable, "-c", WITHOUT, "playwright", "-q", "-m", "browser", "-p", "no:cacheprovider",
                          "tests/test_app_browser.py"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    summary = run.stdout.strip().splitlines()[-1]
    assert ("3 failed" if ci else "3 skipped") in summary, run.stdout[-3000:]
    assert "the browser tests need playwright" in run.stdout if ci else run.returncode == 0
