"""How the reference harnesses run each dataset's tests: test commands, log parsers, image names.

Sources (read, then encoded as data here):

- SWE-bench (and Verified, Lite): SWE-bench/SWE-bench v4.1.0,
  swebench/harness/constants/python.py (`MAP_REPO_VERSION_TO_SPECS_PY`: ``test_cmd`` and
  ``eval_commands`` per repo and version), log_parsers/python.py (`MAP_REPO_TO_PARSER_PY`),
  test_spec/python.py (`get_test_directives`, `make_eval_script_list_py`: the test command is
  ``test_cmd`` followed by the directives) and test_spec/test_spec.py (`instance_image_key`).
- SWE-Gym: SWE-Gym/SWE-Bench-Fork at 242429c, swebench/harness/constants.py (specs of the SWE-Gym
  repositories), log_parsers.py, test_spec.py (`make_test_command`: python/mypy selects the
  ``[case ...]`` names of its test-data files with ``-k``). Images: the SWE-Gym release pushes
  ``xingyaoww/sweb.eval.x86_64.<id with "__" -> "_s_">``.
- SWE-rebench: the rows carry their own ``install_config`` (see `agent.tasks.loaders`).

Everything here is pure: strings in, strings out.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "PARSER_NAMES",
    "TestSpec",
    "harness_spec",
    "our_parser",
    "swebench_image",
    "swegym_image",
    "test_directives",
]

# The log parsers of agent/grading/parsers.py (`PARSERS`), by name.
PARSER_NAMES = ("pytest", "pytest_options", "pytest_v2", "django", "sympy", "seaborn", "matplotlib")

# Reference parser function -> ours. SWE-Gym's parse_log_pytest_pydantic is parse_log_pytest_v2
# plus dropping a "[...]" right after FAILED; it maps to "pytest_v2" (the closest we have).
# Task.metadata["harness"]["log_parser"] keeps the reference name.
_PARSER_TO_OURS = {
    "parse_log_pytest": "pytest",
    "parse_log_pytest_options": "pytest_options",
    "parse_log_pytest_v2": "pytest_v2",
    "parse_log_pytest_pydantic": "pytest_v2",
    "parse_log_django": "django",
    "parse_log_sympy": "sympy",
    "parse_log_seaborn": "seaborn",
    "parse_log_matplotlib": "matplotlib",
}


def our_parser(reference_name: str) -> str | None:
    """Our parser for a reference parser name ("parse_log_pytest") or one of ours; None if none."""
    if reference_name in PARSER_NAMES:
        return reference_name
    return _PARSER_TO_OURS.get(reference_name)


# ---------------------------------------------------------------------------------------------
# SWE-bench (v4.1.0): test_cmd per repo and version.

_PYTEST = "pytest -rA"  # TEST_PYTEST; the module defines it twice and this second value wins
_ASTROPY_OLD = "pytest -rA -vv -o console_output_style=classic --tb=no"
_DJANGO = "./tests/runtests.py --verbosity 2 --settings=test_sqlite --parallel 1"
_DJANGO_NO_PARALLEL = "./tests/runtests.py --verbosity 2"
_SEABORN = "pytest --no-header -rA"
_SPHINX = "tox --current-env -epy39 -v --"
_SYMPY = "PYTHONWARNINGS='ignore::UserWarning,ignore::SyntaxWarning' bin/test -C --verbose"

_DJANGO_LOCALE_OLD = ("export LANG=en_US.UTF-8", "export LC_ALL=en_US.UTF-8",
                      "export PYTHONIOENCODING=utf8", "export LANGUAGE=en_US:en")
_DJANGO_LOCALE_3 = ("sed -i '/en_US.UTF-8/s/^# //g' /etc/locale.gen && locale-gen",
                    "export LANG=en_US.UTF-8", "export LANGUAGE=en_US:en", "export LC_ALL=en_US.UTF-8")


def _versions(versions: str, test_cmd: str, eval_commands: tuple[str, ...] = ()) -> dict:
    return {v: (test_cmd, eval_commands) for v in versions.split()}


# repo -> (reference parser, {version: (test_cmd, eval_commands)})
_SWEBENCH: dict[str, tuple[str, dict[str, tuple[str, tuple[str, ...]]]]] = {
    "astropy/astropy": ("parse_log_pytest_v2", {
        **_versions("3.0 3.1 3.2 4.1 4.2 4.3 5.0 5.1 5.2 v5.3", _PYTEST),
        **_versions("0.1 0.2 0.3 0.4 1.1 1.2 1.3", _ASTROPY_OLD)}),
    "django/django": ("parse_log_django", {
        **_versions("1.4 1.5 1.6 4.0 4.1 4.2 5.0 5.1 5.2", _DJANGO),
        **_versions("1.7 1.8 1.10 1.11 2.0 2.1 2.2", _DJANGO, _DJANGO_LOCALE_OLD),
        **_versions("1.9", _DJANGO_NO_PARALLEL, _DJANGO_LOCALE_OLD),
        **_versions("3.0 3.1 3.2", _DJANGO, _DJANGO_LOCALE_3)}),
    "pallets/flask": ("parse_log_pytest", _versions("2.0 2.1 2.2 2.3 3.0 3.1", _PYTEST)),
    "matplotlib/matplotlib": ("parse_log_matplotlib", _versions(
        "1.0 1.1 1.2 1.3 1.4 1.5 2.0 2.1 2.2 3.0 3.1 3.2 3.3 3.4 3.5 3.6 3.7 3.8 3.9", _PYTEST)),
    "pylint-dev/pylint": ("parse_log_pytest_options", _versions(
        "2.8 2.9 2.10 2.11 2.13 2.14 2.15 2.16 2.17 3.0 3.1 3.2 3.3 4.0", _PYTEST)),
    "pytest-dev/pytest": ("parse_log_pytest", _versions(
        "4.4 4.5 4.6 5.0 5.1 5.2 5.3 5.4 6.0 6.2 6.3 7.0 7.1 7.2 7.4 8.0 8.1 8.2 8.3 8.4", _PYTEST)),
    "psf/requests": ("parse_log_pytest_options", _versions(
        "0.7 0.8 0.9 0.11 0.13 0.14 1.1 1.2 2.0 2.2 2.3 2.4 2.5 2.7 2.8 2.9 2.10 2.11 2.12 2.17 "
        "2.18 2.19 2.22 2.25 2.26 2.27 2.31 3.0", _PYTEST)),
    "scikit-learn/scikit-learn": ("parse_log_pytest_v2", _versions(
        "0.20 0.21 0.22 1.3 1.4 1.5 1.6", _PYTEST)),
    "mwaskom/seaborn": ("parse_log_seaborn", _versions("0.11 0.12 0.13 0.14", _SEABORN)),
    "sphinx-doc/sphinx": ("parse_log_pytest_v2", _versions(
        "1.5 1.6 1.7 1.8 2.0 2.1 2.2 2.3 2.4 3.0 3.1 3.2 3.3 3.4 3.5 4.0 4.1 4.2 4.3 4.4 4.5 "
        "5.0 5.1 5.2 5.3 6.0 6.2 7.0 7.1 7.2 7.3 7.4 8.0 8.1", _SPHINX)),
    "sympy/sympy": ("parse_log_sympy", _versions(
        "0.7 1.0 1.1 1.2 1.4 1.5 1.6 1.7 1.8 1.9 1.10 1.11 1.12 1.13 1.14", _SYMPY)),
    "pydata/xarray": ("parse_log_pytest", _versions(
        "0.12 0.18 0.19 0.20 2022.03 2022.06 2022.09 2023.07 2024.05", _PYTEST)),
}

# ---------------------------------------------------------------------------------------------
# SWE-Gym (SWE-Bench-Fork 242429c). Every version of a repository shares its test command,
# except python/mypy; versions are therefore not checked for the others.

_MYPY_NEW = "pytest -rA -k"  # mypy 1.7-1.11
_MYPY_OLD = "pytest -n0 -rA -k"  # mypy 0.800-1.6
_MYPY_NEW_VERSIONS = frozenset("1.7 1.8 1.9 1.10 1.11".split())
_MYPY_OLD_VERSIONS = frozenset(
    "0.800 0.810 0.820 0.910 0.920 0.940 0.950 0.960 0.970 0.980 0.990 1.0 1.1 1.2 1.3 1.4 1.5 1.6".split())
_CONAN_PYTHONPATH = ("export PYTHONPATH=${PYTHONPATH:-}:$(pwd)",)

# repo (lowercase, as the fork keys it) -> (reference parser, test_cmd, eval_commands)
_SWEGYM: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "getmoto/moto": ("parse_log_pytest", "pytest -n0 -rA", ()),
    "conan-io/conan": ("parse_log_pytest", "pytest -n0 -rA", _CONAN_PYTHONPATH),
    "dask/dask": ("parse_log_pytest", "pytest -n0 -rA  --color=no", ()),
    "project-monai/monai": ("parse_log_pytest", "pytest -rA ", ()),
    "iterative/dvc": ("parse_log_pytest", "pytest -rA", ()),
    "bokeh/bokeh": ("parse_log_pytest", "pytest -rA -n0", ()),
    "modin-project/modin": ("parse_log_pytest", "pytest -n0 -rA", ()),
    "hypothesisworks/hypothesis": ("parse_log_pytest", "pytest -n0 -rA --tb=no --no-header", ()),
    "pydantic/pydantic": ("parse_log_pytest_pydantic",
                          "pytest -rA --tb=short -vv -o console_output_style=classic --no-header", ()),
    "pandas-dev/pandas": ("parse_log_pytest", "pytest -rA --tb=long", ()),
    "facebookresearch/hydra": ("parse_log_pytest", "pytest -rA --tb=long", ()),
    "python/mypy": ("parse_log_pytest", "", ()),  # by version, below
}

# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TestSpec:
    """How a SWE-bench-schema task's tests are run, as its reference harness does."""

    __test__ = False  # not a pytest test class

    dataset: str  # "swebench" or "swegym"
    test_command: str  # test_cmd followed by the test directives
    reference_parser: str  # the harness's parser function name
    log_parser: str  # ours
    eval_commands: tuple[str, ...]  # shell lines the harness runs before test_command (same shell)
    directives: tuple[str, ...]


class SpecError(ValueError):
    """No reference spec for this row; `field` names the column to blame ("repo" or "version")."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        super().__init__(message)


# Files that SWE-bench does not pass to the test runner (NON_TEST_EXTS; "csv" has no dot there).
_NON_TEST_EXTS = (".json", ".png", "csv", ".txt", ".md", ".jpg", ".jpeg", ".pkl", ".yml", ".yaml", ".toml")
_DIFF_GIT_B_PATH = re.compile(r"diff --git a/.* b/(.*)")


def test_directives(repo: str, test_patch: str, paths: list[str] | None = None) -> list[str]:
    """The files of `test_patch` given to the test runner (SWE-bench `get_test_directives`).

    `paths` overrides how files are found; by default the harness's regex over
    ``diff --git a/... b/...`` lines. Non-test files are dropped; for django/django a path becomes
    a test module: ``tests/auth_tests/test_validators.py`` -> ``auth_tests.test_validators``.
    """
    directives = _DIFF_GIT_B_PATH.findall(test_patch) if paths is None else list(paths)
    directives = [d for d in directives if not d.endswith(_NON_TEST_EXTS)]
    if repo == "django/django":
        directives = [d.removesuffix(".py").removeprefix("tests/").replace("/", ".") for d in directives]
    return directives


test_directives.__test__ = False  # a library function, not a pytest test


def harness_spec(repo: str, version: str, test_patch: str) -> TestSpec:
    """The SWE-bench or SWE-Gym test spec of a row; `SpecError` for an unknown repo or version."""
    if repo in _SWEBENCH:
        reference_parser, versions = _SWEBENCH[repo]
        if version not in versions:
            known = " ".join(versions)
            raise SpecError("version", f"{version!r} is not a {repo} version of the SWE-bench harness "
                                       f"(v4.1.0 knows: {known})")
        test_cmd, eval_commands = versions[version]
        directives = test_directives(repo, test_patch)
        command = " ".join([test_cmd, *directives])
        return TestSpec("swebench", command, reference_parser, _PARSER_TO_OURS[reference_parser],
                        eval_commands, tuple(directives))
    key = repo.lower()
    if key in _SWEGYM:
        reference_parser, test_cmd, eval_commands = _SWEGYM[key]
        if key == "python/mypy":
            # make_test_command: select the [case NAME] blocks of the test patch with -k.
            if version in _MYPY_NEW_VERSIONS:
                test_cmd = _MYPY_NEW
            elif version in _MYPY_OLD_VERSIONS:
                test_cmd = _MYPY_OLD
            else:
                raise SpecError("version", f"{version!r} is not a python/mypy version of the SWE-Gym harness")
            cases = re.findall(r"\[case ([^\]]+)\]", test_patch)
            if not cases:
                raise SpecError("test_patch", "python/mypy test patch has no '[case NAME]' block to select")
            directives = tuple(cases)
            command = f'{test_cmd} "{" or ".join(cases)}"'
        else:
            directives = tuple(test_directives(repo, test_patch))
            command = " ".join([test_cmd, *directives])
        return TestSpec("swegym", command, reference_parser, _PARSER_TO_OURS[reference_parser],
                        eval_commands, directives)
    raise SpecError("repo", f"{repo!r} is not a SWE-bench or SWE-Gym repository; rows of other "
                            "datasets need an install_config (SWE-rebench schema)")


def _image(instance_id: str, token: str, namespace: str, tag: str) -> str:
    name = f"sweb.eval.x86_64.{instance_id.replace('__', token)}".lower()
    if namespace:
        name = f"{namespace.rstrip('/')}/{name}"
    if tag:
        name = f"{name}:{tag}"
    return f"podman:{name}"


def swebench_image(instance_id: str, *, namespace: str = "", tag: str = "") -> str:
    """``podman:sweb.eval.x86_64.django_1776_django-11099``: the harness's instance image key.

    Docker forbids "__" in a name, so the harness's published images use "_1776_" there
    (``swebench/sweb.eval.x86_64.<id>:latest`` on Docker Hub, lowercase). Pass
    ``namespace="docker.io/swebench", tag="latest"`` for the name as pulled.
    """
    return _image(instance_id, "_1776_", namespace, tag)


def swegym_image(instance_id: str, *, namespace: str = "", tag: str = "") -> str:
    """``podman:sweb.eval.x86_64.getmoto_s_moto-5752``: SWE-Gym's images use "_s_" for "__".

    As pulled: ``namespace="docker.io/xingyaoww", tag="latest"``.
    """
    return _image(instance_id, "_s_", namespace, tag)
