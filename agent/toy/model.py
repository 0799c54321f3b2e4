"""What a toy repository template is made of: correct sources, tests, and the bugs it can carry.

Sources are Python text in which ``__PKG__`` stands for the package name (a seeded choice per task).
A `BugSite` is one injectable bug: an exact snippet of a correct module (`fixed`) and what it
becomes (`buggy`), the public function a user would call to hit it (`entry_*`, always in another
module, so a level-3 issue can describe the symptom without naming the buggy file), the
FAIL_TO_PASS tests that go into the task's test patch, and the facts of the issue text.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

__all__ = ["BUG_KINDS", "BugSite", "Template", "test_ids"]

BUG_KINDS: tuple[str, ...] = (
    "off_by_one",
    "wrong_operator",
    "wrong_default",
    "missing_edge_case",
    "swapped_arguments",
    "wrong_return",
    "exception_handling",
    "string_formatting",
)

PKG = "__PKG__"


@dataclass(frozen=True)
class BugSite:
    kind: str  # one of BUG_KINDS
    module: str  # the buggy module's file name inside the package, e.g. "units.py"
    function: str  # the buggy function, e.g. "parse_quantity" or "Stock.needs_reorder"
    fixed: str  # exact, unique snippet of the correct module
    buggy: str  # what `fixed` becomes in the task's repository
    entry_module: str  # the module of the public function the user called (not `module`)
    entry_function: str
    test_file: str  # test file (repository path) that the test patch extends
    tests: str  # FAIL_TO_PASS tests; leading import lines go to the file's imports
    title: str  # issue title: the symptom, in the user's words
    story: str  # what the user did
    snippet: str  # the code the user ran; imports from the package itself, never from a module
    expected: str
    actual: str
    breaks: tuple[str, ...] = ()  # existing tests ("file::name[id]") that fail with the bug: also FAIL_TO_PASS

    def __post_init__(self) -> None:
        if self.kind not in BUG_KINDS:
            raise ValueError(f"BugSite.kind: unknown bug kind {self.kind!r}")
        if self.module == self.entry_module:
            raise ValueError(f"BugSite.entry_module: must differ from module {self.module!r} (level-3 issues)")
        if self.fixed == self.buggy:
            raise ValueError("BugSite.buggy: must differ from fixed")

    @property
    def short_function(self) -> str:
        return self.function.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Template:
    name: str  # e.g. "inventory"; the unit of the train/held-out split
    packages: tuple[str, ...]  # package names to choose from
    description: str  # one line: what the library does
    context: str  # one sentence of an issue: how the reporter uses the library
    modules: dict[str, str]  # file name inside the package -> correct source
    exports: dict[str, tuple[str, ...]]  # module -> names re-exported by the package's __init__
    tests: dict[str, str]  # test file path -> source (the PASS_TO_PASS tests)
    sites: tuple[BugSite, ...]

    def __post_init__(self) -> None:
        for module in self.exports:
            if module not in self.modules:
                raise ValueError(f"Template {self.name!r}: exports from unknown module {module!r}")
        kinds = {site.kind for site in self.sites}
        if missing := [k for k in BUG_KINDS if k not in kinds]:
            raise ValueError(f"Template {self.name!r}: no bug site of kind {missing}")
        for site in self.sites:
            for name in (site.module, site.entry_module):
                if name not in self.modules:
                    raise ValueError(f"Template {self.name!r}: site {site.kind} names unknown module {name!r}")
            count = self.modules[site.module].count(site.fixed)
            if count != 1:
                raise ValueError(f"Template {self.name!r}: site {site.kind}: `fixed` occurs {count} times "
                                 f"in {site.module}, expected once")
            if site.test_file not in self.tests:
                raise ValueError(f"Template {self.name!r}: site {site.kind}: unknown test file {site.test_file!r}")


def test_ids(path: str, source: str) -> list[str]:
    """pytest node ids of the tests in `source`: module-level ``test_*`` functions and ``test_*``
    methods of ``Test*`` classes; a ``parametrize(..., ids=[...])`` decorator expands to its ids."""
    ids: list[str] = []

    def visit(node: ast.FunctionDef, prefix: str) -> None:
        params: list[str | None] = [None]
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and getattr(dec.func, "attr", "") == "parametrize":
                given = [kw.value for kw in dec.keywords if kw.arg == "ids"]
                if not given:
                    raise ValueError(f"{path}::{node.name}: parametrize needs an explicit ids=[...] list")
                params = list(ast.literal_eval(given[0]))
        for param in params:
            ids.append(f"{prefix}::{node.name}" + (f"[{param}]" if param is not None else ""))

    for node in ast.parse(source).body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
            visit(node, path)
        elif isinstance(node, ast.ClassDef) and node.name.startswith("Test"):
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test_"):
                    visit(item, f"{path}::{node.name}")
    return ids


test_ids.__test__ = False  # type: ignore[attr-defined]
