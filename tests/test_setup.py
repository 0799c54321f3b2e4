"""The README's commands: `make test` fails when a test fails or when no test ran (pytest's exit 5),
and the set-up is idempotent and quiet when nothing changed."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def make_test(args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run(["make", "-s", "test", f"PYTEST_ARGS={args}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def failing_test(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ci") / "test_fails.py"
    path.write_text("def test_fails():\n    assert 1 + 1 == 3\n")
    return path


def test_make_test_fails_when_a_test_fails(failing_test):
    result = make_test(f"-p no:cacheprovider {failing_test}")
    assert result.returncode != 0
    assert "1 failed" in result.stdout


def test_make_test_fails_when_no_test_ran():
    result = make_test("-p no:cacheprovider tests/test_setup.py -k no_test_has_this_name")
    assert result.returncode != 0
    assert "collected no tests" in result.stderr


def test_ci_script_calls_exactly_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci.splitlines()[-1]
    assert "make test" in (ROOT / "README.md").read_text()


def test_setup_is_quiet_when_nothing_changed():
    subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, check=True, capture_output=True, timeout=600)
    again = subprocess.run(["bash", "scripts/bootstrap.sh"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0
    assert again.stdout == "" and again.stderr == ""
