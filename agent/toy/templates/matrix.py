"""Template: matrix operations on lists of rows."""

from ..model import BugSite, Template

CHECKS = r'''"""Shapes, parsing and formatting of matrices (lists of rows)."""


class ShapeError(ValueError):
    """The matrices do not have the shapes the operation needs."""


def shape(m):
    """(rows, columns); a ragged matrix is a ShapeError."""
    if not m:
        return (0, 0)
    cols = len(m[0])
    for row in m:
        if len(row) != cols:
            raise ShapeError("ragged matrix: rows have different lengths")
    return (len(m), cols)


def identity(n):
    return [[1 if i == j else 0 for j in range(n)] for i in range(n)]


def parse_matrix(text):
    """Rows separated by ";", numbers by spaces: "1 2; 3 4"."""
    rows = []
    for line in text.split(";"):
        try:
            rows.append([float(x) for x in line.split()])
        except ValueError:
            raise ValueError(f"bad number in row {line.strip()!r}") from None
    shape(rows)
    return rows


def format_cell(value, width=7, places=2):
    """A number right-aligned in `width` characters, with `places` decimals."""
    return f"{value:>{width}.{places}f}"
'''

OPS = r'''"""Matrix arithmetic on lists of rows."""

from .checks import ShapeError, identity, shape


def add(a, b):
    if shape(a) != shape(b):
        raise ShapeError(f"cannot add {shape(a)} and {shape(b)}")
    return [[x + y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def subtract(a, b):
    if shape(a) != shape(b):
        raise ShapeError(f"cannot subtract {shape(b)} from {shape(a)}")
    return [[x - y for x, y in zip(ra, rb)] for ra, rb in zip(a, b)]


def transpose(m):
    rows, cols = shape(m)
    flipped = [[m[r][c] for r in range(rows)] for c in range(cols)]
    return flipped


def matmul(a, b):
    (n, k), (k2, p) = shape(a), shape(b)
    if k != k2:
        raise ShapeError(f"cannot multiply {n}x{k} by {k2}x{p}")
    return [[sum(a[i][t] * b[t][j] for t in range(k)) for j in range(p)] for i in range(n)]


def power(m, n):
    """`m` multiplied by itself `n` times (the identity for n = 0)."""
    rows, cols = shape(m)
    if rows != cols:
        raise ShapeError("only a square matrix has powers")
    result = identity(rows)
    for _ in range(n):
        result = matmul(result, m)
    return result


def outer(u, v):
    """The outer product: len(u) rows, len(v) columns."""
    return [[x * y for y in v] for x in u]


def multiplication_table(rows, cols):
    """Row i, column j holds i * j (both counted from 1)."""
    return outer(range(1, rows + 1), range(1, cols + 1))
'''

REPORT = r'''"""Printing matrices, and a few summaries."""

from .checks import format_cell, parse_matrix, shape
from .ops import matmul, multiplication_table, power, subtract, transpose


def render(m):
    """One line per row, cells right-aligned."""
    return "\n".join(" ".join(format_cell(x) for x in row) for row in m)


def render_text(text):
    """Render a matrix written as text ("1 2; 3 4")."""
    return render(parse_matrix(text))


def summary(m):
    rows, cols = shape(m)
    return f"{rows}x{cols} matrix"


def change(before, after):
    """The element-wise change from `before` to `after`, rendered."""
    return render(subtract(after, before))


def column_sums(m):
    return [sum(col) for col in transpose(m)]


def times_table(rows, cols):
    return render(multiplication_table(rows, cols))


def state_after(step_matrix, state, steps):
    """A state (row vector) after `steps` applications of `step_matrix` (a Markov chain)."""
    return matmul([state], power(step_matrix, steps))[0]
'''

TEST_CHECKS = r'''import pytest

from __PKG__.checks import ShapeError, format_cell, identity, parse_matrix, shape


def test_shape():
    assert shape([[1, 2, 3], [4, 5, 6]]) == (2, 3)


def test_ragged_matrix():
    with pytest.raises(ShapeError):
        shape([[1, 2], [3]])


def test_identity():
    assert identity(2) == [[1, 0], [0, 1]]


def test_parse_matrix():
    assert parse_matrix("1 2; 3 4") == [[1.0, 2.0], [3.0, 4.0]]


@pytest.mark.parametrize("value, width, expected", [(3.14159, 4, "3.14"), (-2, 5, "-2.00")], ids=["pi", "negative"])
def test_format_cell_full_width(value, width, expected):
    assert format_cell(value, width=width, places=2) == expected
'''

TEST_OPS = r'''import pytest

from __PKG__.checks import ShapeError
from __PKG__.ops import add, matmul, outer, power, subtract, transpose


def test_add():
    assert add([[1, 2]], [[3, 4]]) == [[4, 6]]


def test_add_shape_mismatch():
    with pytest.raises(ShapeError):
        add([[1, 2]], [[1], [2]])


def test_matmul():
    assert matmul([[1, 2], [3, 4]], [[5], [6]]) == [[17], [39]]


def test_power_zero_is_identity():
    assert power([[2, 0], [0, 2]], 0) == [[1, 0], [0, 1]]


def test_transpose_symmetric():
    assert transpose([[1, 2], [2, 1]]) == [[1, 2], [2, 1]]


def test_outer():
    assert outer([1, 2], [3]) == [[3], [6]]


def test_subtract_zero():
    assert subtract([[5, 7]], [[0, 0]]) == [[5, 7]]
'''

TEST_REPORT = r'''import pytest

from __PKG__.report import change, column_sums, render, render_text, state_after, summary, times_table


def test_summary():
    assert summary([[1, 2]]) == "1x2 matrix"


def test_column_sums_symmetric():
    assert column_sums([[1, 2], [2, 1]]) == [3, 3]


def test_state_after_zero_steps():
    assert state_after([[0, 1], [1, 0]], [1, 0], 0) == [1, 0]


def test_times_table_one_by_one():
    assert times_table(1, 1) == "   1.00"
'''

SITES = (
    BugSite(
        kind="off_by_one", module="ops.py", function="power",
        fixed="    for _ in range(n):\n", buggy="    for _ in range(1, n):\n",
        entry_module="report.py", entry_function="state_after", test_file="tests/test_report.py",
        tests=r'''
def test_state_after_applies_every_step():
    swap = [[0, 1], [1, 0]]
    assert state_after(swap, [1, 0], 1) == [0, 1]
    assert state_after(swap, [1, 0], 3) == [0, 1]
''',
        title="state_after() applies the step matrix one time too few",
        story="I model a two-state Markov chain where the step matrix swaps the states. After one step the "
              "state should have moved, but it has not.",
        snippet=r'''from __PKG__ import state_after

print(state_after([[0, 1], [1, 0]], [1, 0], 1))
''',
        expected="`[0, 1]`",
        actual="`[1, 0]`",
    ),
    BugSite(
        kind="wrong_operator", module="ops.py", function="subtract",
        fixed="[[x - y for x, y", buggy="[[x + y for x, y",
        entry_module="report.py", entry_function="change", test_file="tests/test_report.py",
        tests=r'''
def test_change_is_after_minus_before():
    assert change([[1, 2]], [[4, 6]]) == "   3.00    4.00"
''',
        title="change() adds the two matrices instead of taking the difference",
        story="We compare this month's sales matrix with last month's using `change()`. Every cell comes "
              "out as the sum of the two months.",
        snippet=r'''from __PKG__ import change

print(change([[1, 2]], [[4, 6]]))
''',
        expected="`   3.00    4.00`",
        actual="`   5.00    8.00`",
    ),
    BugSite(
        kind="wrong_default", module="checks.py", function="format_cell",
        fixed="def format_cell(value, width=7, places=2):", buggy="def format_cell(value, width=7, places=3):",
        entry_module="report.py", entry_function="render", test_file="tests/test_report.py",
        tests=r'''
def test_render_uses_two_decimals():
    assert render([[1, 2.5]]) == "   1.00    2.50"
''',
        breaks=("tests/test_report.py::test_times_table_one_by_one",),
        title="render() prints three decimals instead of two",
        story="Rendered matrices used to have two decimals, and our reports are laid out for that, "
              "but now we get three.",
        snippet=r'''from __PKG__ import render

print(render([[1, 2.5]]))
''',
        expected="`   1.00    2.50`",
        actual="`  1.000   2.500`",
    ),
    BugSite(
        kind="missing_edge_case", module="checks.py", function="shape",
        fixed="    if not m:\n        return (0, 0)\n", buggy="",
        entry_module="report.py", entry_function="summary", test_file="tests/test_report.py",
        tests=r'''
def test_summary_of_an_empty_matrix():
    assert summary([]) == "0x0 matrix"
''',
        title="summary() crashes on an empty matrix",
        story="Filtering our data can leave no rows at all, and `summary()` then crashes the whole report.",
        snippet=r'''from __PKG__ import summary

print(summary([]))
''',
        expected="`0x0 matrix`",
        actual="`IndexError: list index out of range`",
    ),
    BugSite(
        kind="swapped_arguments", module="ops.py", function="multiplication_table",
        fixed="return outer(range(1, rows + 1), range(1, cols + 1))",
        buggy="return outer(range(1, cols + 1), range(1, rows + 1))",
        entry_module="report.py", entry_function="times_table", test_file="tests/test_report.py",
        tests=r'''
def test_times_table_has_rows_then_columns():
    assert times_table(2, 3) == "   1.00    2.00    3.00\n   2.00    4.00    6.00"
''',
        title="times_table(2, 3) prints 3 rows of 2 numbers",
        story="For a school worksheet I asked for a times table with 2 rows and 3 columns and got it "
              "transposed.",
        snippet=r'''from __PKG__ import times_table

print(times_table(2, 3))
''',
        expected="two rows of three numbers (1 2 3 and 2 4 6)",
        actual="three rows of two numbers (1 2, then 2 4, then 3 6)",
    ),
    BugSite(
        kind="wrong_return", module="ops.py", function="transpose",
        fixed="    return flipped\n", buggy="    return m\n",
        entry_module="report.py", entry_function="column_sums", test_file="tests/test_report.py",
        tests=r'''
def test_column_sums():
    assert column_sums([[1, 2], [3, 4]]) == [4, 6]
''',
        title="column_sums() returns the row sums",
        story="For a 2 x 2 matrix the column sums I get are the sums of the rows.",
        snippet=r'''from __PKG__ import column_sums

print(column_sums([[1, 2], [3, 4]]))
''',
        expected="`[4, 6]`",
        actual="`[3, 7]`",
    ),
    BugSite(
        kind="exception_handling", module="checks.py", function="parse_matrix",
        fixed="        except ValueError:\n            raise ValueError(f\"bad number in row {line.strip()!r}\") from None\n",
        buggy="        except ValueError:\n            continue\n",
        entry_module="report.py", entry_function="render_text", test_file="tests/test_report.py",
        tests=r'''
def test_render_text_rejects_bad_numbers():
    with pytest.raises(ValueError, match="bad number"):
        render_text("1 2; 3 x")
''',
        title="render_text() silently drops rows with a typo",
        story="We paste matrices from emails into `render_text()`. A row with a typo just disappeared from "
              "the output instead of raising an error.",
        snippet=r'''from __PKG__ import render_text

print(render_text("1 2; 3 x"))
''',
        expected="a `ValueError` pointing at the row `'3 x'`",
        actual="no error; only the first row is printed",
    ),
    BugSite(
        kind="string_formatting", module="checks.py", function="format_cell",
        fixed="{value:>{width}.{places}f}", buggy="{value:<{width}.{places}f}",
        entry_module="report.py", entry_function="render", test_file="tests/test_report.py",
        tests=r'''
def test_render_right_aligns_cells():
    assert render([[1, 10]]) == "   1.00   10.00"
''',
        breaks=("tests/test_report.py::test_times_table_one_by_one",),
        title="render() aligns numbers to the left",
        story="The docstring of `render()` says cells are right-aligned, but numbers with a different number "
              "of digits do not line up on the decimal point.",
        snippet=r'''from __PKG__ import render

print(repr(render([[1, 10]])))
''',
        expected="`'   1.00   10.00'`",
        actual="`'1.00    10.00  '`",
    ),
)

TEMPLATE = Template(
    name="matrix",
    packages=("matkit", "gridcalc", "rowmath"),
    description="Matrix operations on plain lists of rows, with a text renderer.",
    context="We use __PKG__ for small matrix computations in our teaching material.",
    modules={"checks.py": CHECKS, "ops.py": OPS, "report.py": REPORT},
    exports={"report.py": ("change", "column_sums", "render", "render_text", "state_after", "summary", "times_table")},
    tests={"tests/test_checks.py": TEST_CHECKS, "tests/test_ops.py": TEST_OPS, "tests/test_report.py": TEST_REPORT},
    sites=SITES,
)
