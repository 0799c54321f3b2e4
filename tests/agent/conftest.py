import os
import subprocess

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A small byte-level BPE with a ChatML template (agent.fakes.tiny_tokenizer)."""
    from agent.fakes import tiny_tokenizer as build

    return build()


@pytest.fixture
def toy_repo(tmp_path):
    """A tiny git repository with a bug: add() subtracts. Returns (path, base_commit)."""
    repo = tmp_path / "repo"
    (repo / "pkg").mkdir(parents=True)
    (repo / "pkg" / "__init__.py").write_text("")
    (repo / "pkg" / "calc.py").write_text("def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n")
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "base"]):
        subprocess.run(["git", *args], cwd=repo, env=env, check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    return repo, commit
