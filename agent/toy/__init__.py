"""The toy suite: small seeded Python repositories with one injected bug each, graded like SWE-bench.

`generate_suite(seed, n_train, n_heldout, out_dir) -> list[Task]` writes one git repository per
task (see `agent.toy.generate` for the layout; `Task.repo` is the repository's absolute path and
`Task.image` is "host") and returns the tasks: issue text, test patch with FAIL_TO_PASS tests,
PASS_TO_PASS tests already in the repository, gold patch, test command
(``<python> -m pytest -rA -p no:cacheprovider <test files>`` with plugin autoload off; `python`
is an argument, "python" by default), parser "pytest".

Six repository templates (`TEMPLATES`) each carry all eight bug kinds (`BUG_KINDS`); train and
held-out splits use disjoint templates (`TRAIN_TEMPLATES`, `HELDOUT_TEMPLATES`). Difficulty 1..3
sets how much the issue text reveals about where the bug is (`agent.toy.issues`).
"""

from .generate import TEST_COMMAND, generate_suite, render_task_files
from .issues import LEVELS, issue_text
from .model import BUG_KINDS, BugSite, Template, test_ids
from .templates import HELDOUT_TEMPLATES, TEMPLATES, TRAIN_TEMPLATES

__all__ = [
    "BUG_KINDS",
    "HELDOUT_TEMPLATES",
    "LEVELS",
    "TEMPLATES",
    "TEST_COMMAND",
    "TRAIN_TEMPLATES",
    "BugSite",
    "Template",
    "generate_suite",
    "issue_text",
    "render_task_files",
    "test_ids",
]
