"""agent.tasks: every dataset flavor in every file format loads to the same Tasks, as the reference
harnesses would run them; bad rows fail naming the task and the field, or are skipped and reported."""

from __future__ import annotations

import datetime
import importlib.util
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from agent.tasks import (
    PARSER_NAMES,
    PatchPair,
    TaskFileError,
    TaskSchemaError,
    detect_flavor,
    detect_format,
    harness_spec,
    load_patch_pairs,
    load_swebench,
    load_swegym,
    load_swerebench,
    load_tasks,
    swebench_image,
    swegym_image,
    tasks_from_rows,
    test_directives,
)

FIXTURES = Path(__file__).parent / "fixtures"
FORMATS = {"jsonl": ".jsonl", "json": ".json", "parquet": ".parquet", "arrow": "_arrow"}
FLAVORS = {"swebench": ("swebench", load_swebench, 3), "swegym": ("swegym", load_swegym, 2),
           "swerebench": ("swerebench", load_swerebench, 2), "swerebench_v1": ("swerebench", load_swerebench, 1)}


# A version of each SWE-bench repository in the harness table.
_SWEBENCH_REPOS = {"astropy/astropy": "4.3", "django/django": "3.0", "pallets/flask": "2.3",
                   "matplotlib/matplotlib": "3.5", "pylint-dev/pylint": "2.15", "pytest-dev/pytest": "7.0",
                   "psf/requests": "2.0", "scikit-learn/scikit-learn": "1.3", "mwaskom/seaborn": "0.12",
                   "sphinx-doc/sphinx": "7.1", "sympy/sympy": "1.7", "pydata/xarray": "2022.06"}


def _rows(name: str) -> list[dict]:
    return [json.loads(line) for line in (FIXTURES / f"{name}.jsonl").read_text().splitlines()]


def _by_id(tasks):
    return {t.id: t for t in tasks}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", FLAVORS)
def test_each_flavor_in_each_format_loads_the_same_tasks(name, fmt):
    flavor, loader, count = FLAVORS[name]
    path = FIXTURES / f"{name}{FORMATS[fmt]}"
    assert detect_format(path) == fmt
    tasks = load_tasks(path)
    assert len(tasks) == count and tasks.skipped == []
    assert tasks == load_tasks(FIXTURES / f"{name}.jsonl")  # field by field, metadata included
    assert loader(path, format=fmt) == tasks
    assert detect_flavor([row for row in _rows(name)]) == flavor


def test_swebench_rows_run_as_the_harness_runs_them():
    tasks = _by_id(load_tasks(FIXTURES / "swebench.jsonl"))
    django = tasks["django__django-11099"]
    assert django.image == "podman:sweb.eval.x86_64.django_1776_django-11099"
    assert django.test_command == ("./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1 "
                                   "auth_tests.test_validators")
    assert django.log_parser == "django"
    assert django.metadata["harness"] == {
        "dataset": "swebench", "log_parser": "parse_log_django", "workdir": "/testbed",
        "eval_commands": ["sed -i '/en_US.UTF-8/s/^# //g' /etc/locale.gen && locale-gen", "export LANG=en_US.UTF-8",
                          "export LANGUAGE=en_US:en", "export LC_ALL=en_US.UTF-8"]}
    assert django.FAIL_TO_PASS == ["test_ascii_validator (auth_tests.test_validators.UsernameValidatorsTests)",
                                   "test_unicode_validator (auth_tests.test_validators.UsernameValidatorsTests)"]
    assert django.gold_patch.startswith("diff --git a/django/contrib/auth/validators.py")
    assert django.environment_setup_commit == "419a78300f7cd27611196e1e464d50fd0385ff27"
    assert {k: django.metadata[k] for k in ("version", "created_at", "difficulty", "hints_text")} == {
        "version": "3.0", "created_at": "2019-03-20T03:46:18Z", "difficulty": "<15 min fix", "hints_text": ""}

    sympy = tasks["sympy__sympy-20590"]
    assert sympy.test_command == ("PYTHONWARNINGS='ignore::UserWarning,ignore::SyntaxWarning' bin/test -C --verbose "
                                  "sympy/core/tests/test_basic.py")
    assert (sympy.log_parser, sympy.FAIL_TO_PASS) == ("sympy", ["test_immutable"])

    astropy = tasks["astropy__astropy-12907"]
    assert astropy.test_command == "pytest -rA astropy/modeling/tests/test_separable.py"
    assert (astropy.log_parser, astropy.metadata["harness"]["log_parser"]) == ("pytest_v2", "parse_log_pytest_v2")
    assert "cright[-right.shape[0]:" not in repr(astropy)  # the gold patch is kept out of logs


def test_harness_table_by_repo_and_version():
    patch = "diff --git a/tests/x/test_a.py b/tests/x/test_a.py\n"
    assert harness_spec("django/django", "1.9", patch).test_command == "./tests/runtests.py --verbosity 2 x.test_a"
    assert harness_spec("astropy/astropy", "1.3", patch).test_command == (
        "pytest -rA -vv -o console_output_style=classic --tb=no tests/x/test_a.py")
    assert harness_spec("mwaskom/seaborn", "0.12", patch).log_parser == "seaborn"
    assert harness_spec("matplotlib/matplotlib", "3.5", patch).log_parser == "matplotlib"
    assert harness_spec("sphinx-doc/sphinx", "7.1", patch).test_command == "tox --current-env -epy39 -v -- tests/x/test_a.py"
    assert harness_spec("pytest-dev/pytest", "5.4", patch).test_command == "pytest -rA tests/x/test_a.py"
    assert harness_spec("psf/requests", "2.0", patch).log_parser == "pytest_options"


def test_parser_names_are_those_of_grading():
    grading = pytest.importorskip("agent.grading")
    assert set(PARSER_NAMES) == set(grading.PARSERS)
    for repo, version in _SWEBENCH_REPOS.items():  # the same parser per SWE-bench repository
        assert harness_spec(repo, version, "").log_parser == grading.PARSER_FOR_REPO[repo], repo


def test_swegym_rows_use_the_swegym_fork_and_images():
    tasks = _by_id(load_tasks(FIXTURES / "swegym.parquet"))
    moto, mypy = tasks["getmoto__moto-5752"], tasks["python__mypy-15413"]
    assert moto.image == "podman:sweb.eval.x86_64.getmoto_s_moto-5752"
    assert moto.test_command == "pytest -n0 -rA tests/test_ssm/test_ssm_boto3.py"
    # python/mypy selects the [case NAME] blocks of its test-data files.
    assert mypy.test_command == 'pytest -n0 -rA -k "testNoCrashFollowImportsForStubs"'
    assert mypy.metadata["harness"]["dataset"] == "swegym" and mypy.log_parser == "pytest"


def test_swerebench_v2_runs_its_own_command_in_the_repo_directory():
    tasks = _by_id(load_tasks(FIXTURES / "swerebench_arrow"))
    starlette, attrs = tasks["encode__starlette-2501"], tasks["python-attrs__attrs-1267"]
    assert starlette.image == "podman:docker.io/swerebenchv2/encode-starlette:2501-ffc67b6"
    assert starlette.test_command == "pytest -rA --tb=no -p no:cacheprovider tests/test_responses.py"
    assert starlette.log_parser == "pytest"
    assert starlette.metadata["harness"] == {"dataset": "swerebench-v2", "log_parser": "parse_log_pytest",
                                             "eval_commands": [], "workdir": "/starlette"}
    assert attrs.test_command == "python -m pip install -q -e .[tests] && pytest -rA tests/test_converters.py"
    # Absent struct fields (None) are dropped, so parquet and JSONL agree.
    assert starlette.metadata["install_config"] == {"base_image_name": "python_base_311", "log_parser": "parse_log_pytest",
                                                    "install": ["pip install -e .", "pip install -r requirements.txt"],
                                                    "test_cmd": ["pytest -rA --tb=no -p no:cacheprovider tests/test_responses.py"]}
    assert starlette.metadata["meta"]["pr_url"] == "https://github.com/encode/starlette/pull/2501"


def test_swerebench_v1_prefixes_the_locale_and_leaves_deleted_test_files_out():
    (tespy,) = load_tasks(FIXTURES / "swerebench_v1.parquet")
    assert tespy.image == "podman:swerebench/sweb.eval.x86_64.oemof_1776_tespy-653"
    assert tespy.test_command == (
        "LANG=C.UTF-8 LC_ALL=C.UTF-8 pytest --no-header -rA --tb=line --color=no -p no:cacheprovider "
        "-W ignore::DeprecationWarning tests/test_components/test_heat_exchangers.py")
    assert tespy.metadata["harness"]["workdir"] == "/testbed"
    assert "pre_install" not in tespy.metadata["install_config"]


def test_test_directives_follow_get_test_directives():
    patch = ("diff --git a/tests/auth_tests/test_validators.py b/tests/auth_tests/test_validators.py\n"
             "diff --git a/tests/auth_tests/fixtures/data.json b/tests/auth_tests/fixtures/data.json\n"
             "diff --git a/tests/i18n/sampleproject/locale.csv b/tests/i18n/sampleproject/locale.csv\n"
             "diff --git a/docs/releases/3.0.txt b/docs/releases/3.0.txt\n"
             "diff --git a/django/test/utils.py b/django/test/utils.py\n")
    assert test_directives("django/django", patch) == ["auth_tests.test_validators", "django.test.utils"]
    assert test_directives("psf/requests", patch) == ["tests/auth_tests/test_validators.py", "django/test/utils.py"]


def test_image_names():
    assert swebench_image("django__django-11099") == "podman:sweb.eval.x86_64.django_1776_django-11099"
    assert swebench_image("sympy__sympy-20590", namespace="docker.io/swebench", tag="latest") == (
        "podman:docker.io/swebench/sweb.eval.x86_64.sympy_1776_sympy-20590:latest")
    assert swegym_image("Project-MONAI__MONAI-6975") == "podman:sweb.eval.x86_64.project-monai_s_monai-6975"


# --- schema errors -----------------------------------------------------------------------------------


def _swebench_row(**changes):
    row = _rows("swebench")[1]  # django__django-11099
    row.update(changes)
    return {k: v for k, v in row.items() if v is not ...}


@pytest.mark.parametrize("changes, prefix", [
    ({"FAIL_TO_PASS": '["test_a", '}, "django__django-11099: FAIL_TO_PASS: expected a JSON list of test names, got "),
    ({"FAIL_TO_PASS": "[]"}, "django__django-11099: FAIL_TO_PASS: empty"),
    ({"PASS_TO_PASS": 5}, "django__django-11099: PASS_TO_PASS: expected a list of test names"),
    ({"FAIL_TO_PASS": '["ok", 3]'}, "django__django-11099: FAIL_TO_PASS: item 1: expected a test name"),
    ({"base_commit": ...}, "django__django-11099: base_commit: missing"),
    ({"base_commit": "HEAD"}, "django__django-11099: base_commit: expected a git commit hash"),
    ({"version": 3.1}, "django__django-11099: version: expected str like '3.0', got 3.1 (float)"),
    ({"version": "9.9"}, "django__django-11099: version: '9.9' is not a django/django version"),
    ({"repo": "someone/else"}, "django__django-11099: repo: 'someone/else' is not a SWE-bench or SWE-Gym repository"),
    ({"repo": "django"}, "django__django-11099: repo: expected 'owner/name'"),
    ({"test_patch": "--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n-a\n"},
     "django__django-11099: test_patch: not a valid patch: line 4: hunk at line 3 ends early"),
    ({"patch": "garbage"}, "django__django-11099: patch: not a valid patch"),
    ({"problem_statement": "  "}, "django__django-11099: problem_statement: empty"),
    ({"instance_id": ...}, "rows row 1: instance_id: missing"),
    ({"harness": "x"}, "django__django-11099: harness: column name is reserved"),
])
def test_schema_errors_name_the_task_and_the_field(changes, prefix):
    with pytest.raises(TaskSchemaError) as info:
        tasks_from_rows([_swebench_row(**changes)], flavor="swebench")
    assert str(info.value).startswith(prefix), str(info.value)
    field = prefix.split(": ")[1]
    assert info.value.field == field


def test_rebench_errors_name_the_nested_field():
    row = _rows("swerebench")[0]
    row["install_config"] = dict(row["install_config"], log_parser="parse_log_jest")
    with pytest.raises(TaskSchemaError, match=r"^encode__starlette-2501: install_config\.log_parser: 'parse_log_jest' "
                                              r"has no counterpart in agent\.grading"):
        tasks_from_rows([row], flavor="swerebench")
    row["install_config"] = {"log_parser": "parse_log_pytest"}
    with pytest.raises(TaskSchemaError, match=r"^encode__starlette-2501: install_config\.test_cmd: missing"):
        tasks_from_rows([row], flavor="swerebench")
    row = _rows("swerebench")[0]
    del row["image_name"]
    with pytest.raises(TaskSchemaError, match=r"^encode__starlette-2501: image_name: missing"):
        tasks_from_rows([row], flavor="swerebench")


def test_bad_rows_are_skipped_and_reported_never_dropped_silently(tmp_path, caplog):
    rows = _rows("swebench")
    lines = [json.dumps(rows[0]), "{not json", json.dumps(dict(rows[1], FAIL_TO_PASS="oops")), json.dumps(rows[2]),
             json.dumps(rows[0])]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TaskSchemaError, match=r"^mixed\.jsonl line 2: row: not valid JSON"):
        load_tasks(path, flavor="swebench")
    with caplog.at_level(logging.WARNING, logger="agent.tasks.loaders"):
        tasks = load_tasks(path, on_error="skip")
    assert [t.id for t in tasks] == ["astropy__astropy-12907", "sympy__sympy-20590"]
    assert [(e.where, e.task_id, e.field) for e in tasks.skipped] == [
        ("mixed.jsonl line 2", None, "row"),
        ("mixed.jsonl line 3", "django__django-11099", "FAIL_TO_PASS"),
        ("mixed.jsonl line 5", "astropy__astropy-12907", "instance_id"),  # duplicate id
    ]
    assert "duplicate of mixed.jsonl line 1" in tasks.skipped[2].message
    assert "skipped 3 of 5 rows" in caplog.text
    with pytest.raises(ValueError, match="on_error"):
        load_tasks(path, on_error="ignore")


def test_files_that_cannot_be_read_raise_file_errors(tmp_path):
    with pytest.raises(TaskFileError, match="no such file"):
        load_tasks(tmp_path / "missing.jsonl")
    (tmp_path / "rows.json").write_text('{"a": 1')
    with pytest.raises(TaskFileError, match="not valid JSON"):
        load_tasks(tmp_path / "rows.json", format="json")
    (tmp_path / "other.jsonl").write_text('{"question": "2+2?", "answer": 4}\n')
    with pytest.raises(TaskFileError, match="cannot tell the dataset from its columns"):
        load_tasks(tmp_path / "other.jsonl")
    with pytest.raises(TaskFileError, match="load_patch_pairs"):
        load_tasks(FIXTURES / "patch_pairs.parquet")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TaskFileError, match="not a datasets.save_to_disk output"):
        load_tasks(tmp_path / "empty_dir")


def test_dataset_dict_splits_are_labelled_and_selectable():
    everything = load_tasks(FIXTURES / "swebench_dict")
    assert [(t.id, t.split) for t in everything] == [("sympy__sympy-20590", "dev"), ("astropy__astropy-12907", "test"),
                                                     ("django__django-11099", "test")]
    assert [t.id for t in load_tasks(FIXTURES / "swebench_dict", split="dev")] == ["sympy__sympy-20590"]
    with pytest.raises(TaskFileError, match="no split 'train'"):
        load_tasks(FIXTURES / "swebench_dict", split="train")
    assert {t.split for t in load_tasks(FIXTURES / "swebench.jsonl", split="test")} == {"test"}


def test_metadata_is_made_msgpack_friendly():
    row = _rows("swegym")[0]
    row["created_at"] = datetime.datetime(2022, 12, 10, 20, 23, 1)
    (task,) = tasks_from_rows([row])
    assert task.metadata["created_at"] == "2022-12-10T20:23:01"
    assert type(task).from_msgpack(task.to_msgpack()) == task


# --- patch pairs -------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_patch_pairs_load_from_every_format(fmt):
    pairs = load_patch_pairs(FIXTURES / f"patch_pairs{FORMATS[fmt]}")
    assert pairs == load_patch_pairs(FIXTURES / "patch_pairs.jsonl") and len(pairs) == 2
    requests, flask = pairs
    assert requests.image is None and flask.image == "dir:/srv/checkouts/pallets__flask-4992"
    assert requests.oracle_patch.startswith("diff --git a/requests/sessions.py") and "to_native_string" not in repr(requests)
    assert requests.metadata == {"pr_url": "https://github.com/psf/requests/pull/2317"}


def test_task_datasets_are_valid_patch_pairs_too():
    pairs = load_patch_pairs(FIXTURES / "swerebench.parquet")
    assert [p.id for p in pairs] == ["encode__starlette-2501", "python-attrs__attrs-1267"]
    assert pairs[0].image == "podman:docker.io/swerebenchv2/encode-starlette:2501-ffc67b6"


def test_patch_pair_validation():
    with pytest.raises(ValueError, match="PatchPair.oracle_patch"):
        PatchPair(id="a", repo="o/r", base_commit="abc1234", problem_statement="x", oracle_patch="")
    with pytest.raises(ValueError, match="PatchPair.image"):
        PatchPair(id="a", repo="o/r", base_commit="abc1234", problem_statement="x", oracle_patch="p", image="docker:x")


# --- fixtures and boundaries -------------------------------------------------------------------------


def _make_fixtures():
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_fixtures_match_their_script():
    module = _make_fixtures()
    for name, rows in module.DATASETS.items():
        assert _rows(name) == rows, f"{name}.jsonl is stale: run tests/agent/fixtures/make_fixtures.py"


def test_save_to_disk_layout_round_trips(tmp_path):
    module = _make_fixtures()
    module.save_to_disk(module.SWEREBENCH, tmp_path / "ds", split="train")
    tasks = load_tasks(tmp_path / "ds")
    assert tasks == load_tasks(FIXTURES / "swerebench.jsonl", split="train")


def test_agent_modules_do_not_import_torch():
    code = "import sys, agent.tasks, agent.rewards, agent.patch; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
