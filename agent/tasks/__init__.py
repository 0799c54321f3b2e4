"""Tasks and datasets: SWE-bench (Verified, Lite), SWE-Gym and SWE-rebench rows as
`runtime.records.Task`, and SWE-RL issue/patch pairs as `PatchPair`.

    tasks = load_tasks("swe-bench-verified.parquet")          # format and flavor detected
    tasks = load_tasks("rebench.jsonl", on_error="skip")      # bad rows in tasks.skipped
    pairs = load_patch_pairs("prs.jsonl")                     # no tests: similarity reward only

Files: JSONL, JSON (a list of rows), parquet, and `datasets.save_to_disk` directories (read with
pyarrow; the `datasets` package is not needed). Nothing is ever downloaded.

Modules: `formats` (files -> rows), `harness` (the reference harnesses' test commands, parsers and
image names), `loaders` (rows -> Task, per flavor), `pairs` (PatchPair), `errors`.
"""

from .errors import LoadResult, RowError, TaskFileError, TaskLoadError, TaskSchemaError
from .formats import FORMATS, detect_format, read_rows
from .harness import PARSER_NAMES, harness_spec, swebench_image, swegym_image, test_directives
from .loaders import (
    FLAVORS,
    detect_flavor,
    load_swebench,
    load_swegym,
    load_swerebench,
    load_tasks,
    task_from_row,
    tasks_from_rows,
)
from .pairs import PatchPair, load_patch_pairs, patch_pairs_from_rows

__all__ = [
    "FLAVORS",
    "FORMATS",
    "PARSER_NAMES",
    "LoadResult",
    "PatchPair",
    "RowError",
    "TaskFileError",
    "TaskLoadError",
    "TaskSchemaError",
    "detect_flavor",
    "detect_format",
    "harness_spec",
    "load_patch_pairs",
    "load_swebench",
    "load_swegym",
    "load_swerebench",
    "load_tasks",
    "patch_pairs_from_rows",
    "read_rows",
    "swebench_image",
    "swegym_image",
    "task_from_row",
    "tasks_from_rows",
    "test_directives",
]
