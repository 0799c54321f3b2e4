"""Template: plane geometry (vectors, polygons, canvas layout)."""

from ..model import BugSite, Template

VECTORS = r'''"""2-D vectors and points as (x, y) tuples."""

import math


def add(a, b):
    return (a[0] + b[0], a[1] + b[1])


def sub(a, b):
    return (a[0] - b[0], a[1] - b[1])


def scale(v, k):
    return (v[0] * k, v[1] * k)


def cross(a, b):
    """The z component of the cross product a x b."""
    return a[0] * b[1] - a[1] * b[0]


def length(v):
    return math.hypot(v[0], v[1])


def distance(a, b):
    return length(sub(b, a))


def lerp(a, b, t):
    """The point a fraction `t` of the way from a to b."""
    return add(a, scale(sub(b, a), t))


def normalize(v):
    """The unit vector in the direction of v."""
    n = length(v)
    if n == 0:
        raise ValueError("cannot normalize the zero vector")
    unit = (v[0] / n, v[1] / n)
    return unit


def fmt_point(p, digits=2):
    """"(1.50, 2.00)"."""
    return f"({p[0]:.{digits}f}, {p[1]:.{digits}f})"
'''

SHAPES = r'''"""Polygons, bounding boxes and point parsing."""

from .vectors import cross, distance, lerp


class Polygon:
    """A simple polygon given by its vertices in order."""

    def __init__(self, points):
        if len(points) < 3:
            raise ValueError("a polygon needs at least 3 points")
        self.points = [tuple(p) for p in points]

    def edges(self):
        n = len(self.points)
        return [(self.points[i], self.points[(i + 1) % n]) for i in range(n)]

    def perimeter(self):
        return sum(distance(a, b) for a, b in self.edges())

    def area(self):
        """The area, by the shoelace formula."""
        return abs(sum(cross(a, b) for a, b in self.edges())) / 2

    def centroid(self):
        """The mean of the vertices."""
        xs = [p[0] for p in self.points]
        ys = [p[1] for p in self.points]
        return (sum(xs) / len(xs), sum(ys) / len(ys))


def bounding_box(points, margin=0.0):
    """((min x, min y), (max x, max y)) of `points`, grown by `margin` on every side."""
    if not points:
        return ((0.0, 0.0), (0.0, 0.0))
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    return ((min(xs) - margin, min(ys) - margin), (max(xs) + margin, max(ys) + margin))


def split_edge(a, b, fraction):
    """The point `fraction` of the way along the edge from a to b."""
    return lerp(a, b, fraction)


def parse_point(text):
    """Parse "x,y" into a point."""
    try:
        x, y = text.split(",")
        return (float(x), float(y))
    except ValueError:
        raise ValueError(f"bad point {text!r}: expected 'x,y'") from None
'''

LAYOUT = r'''"""Laying shapes out on a canvas, and describing them."""

from .shapes import Polygon, bounding_box, parse_point, split_edge
from .vectors import fmt_point, normalize, sub


def total_area(polygons):
    return sum(poly.area() for poly in polygons)


def canvas_size(polygons):
    """(width, height) of the smallest box that holds every polygon."""
    (x0, y0), (x1, y1) = bounding_box([p for poly in polygons for p in poly.points])
    return (x1 - x0, y1 - y0)


def dash_points(a, b, count):
    """The count - 1 points that cut the segment a-b into `count` equal dashes, in order from a."""
    return [split_edge(a, b, i / count) for i in range(1, count)]


def direction(a, b):
    """The unit vector pointing from a to b."""
    return normalize(sub(b, a))


def polygon_from_text(text):
    """A polygon from "x,y x,y x,y ..."."""
    return Polygon([parse_point(token) for token in text.split()])


def describe(poly):
    """"3 vertices, area 6.00, perimeter 12.00, centroid (1.33, 1.00)"."""
    return (f"{len(poly.points)} vertices, area {poly.area():.2f}, "
            f"perimeter {poly.perimeter():.2f}, centroid {fmt_point(poly.centroid())}")
'''

TEST_VECTORS = r'''import pytest

from __PKG__.vectors import add, cross, distance, fmt_point, length, lerp, normalize, sub


def test_add_sub():
    assert add((1, 2), (3, 4)) == (4, 6)
    assert sub((5, 5), (2, 3)) == (3, 2)


def test_cross_of_axes():
    assert cross((1, 0), (0, 1)) == 1


def test_length_and_distance():
    assert length((3, 4)) == 5
    assert distance((1, 1), (4, 5)) == 5


def test_lerp_midpoint():
    assert lerp((0, 0), (2, 4), 0.5) == (1.0, 2.0)


def test_normalize_zero_vector():
    with pytest.raises(ValueError):
        normalize((0, 0))


@pytest.mark.parametrize("digits, expected", [(2, "(1.50, 2.00)"), (0, "(2, 2)")], ids=["two", "zero"])
def test_fmt_point(digits, expected):
    assert fmt_point((1.5, 2.0), digits) == expected
'''

TEST_SHAPES = r'''import pytest

from __PKG__.shapes import Polygon, bounding_box, parse_point, split_edge

TRIANGLE = [(0, 0), (4, 0), (0, 3)]


def test_polygon_needs_three_points():
    with pytest.raises(ValueError):
        Polygon([(0, 0), (1, 1)])


def test_area():
    assert Polygon(TRIANGLE).area() == 6.0
    assert Polygon([(0, 0), (2, 0), (2, 2), (0, 2)]).area() == 4.0


def test_perimeter():
    assert Polygon(TRIANGLE).perimeter() == 12.0


def test_centroid():
    assert Polygon([(0, 0), (2, 0), (2, 2), (0, 2)]).centroid() == (1.0, 1.0)


def test_bounding_box_with_margin():
    assert bounding_box([(1, 2), (3, 5)], margin=1.0) == ((0.0, 1.0), (4.0, 6.0))


def test_split_edge_midpoint():
    assert split_edge((0, 0), (2, 0), 0.5) == (1.0, 0.0)


def test_parse_point():
    assert parse_point("1.5,-2") == (1.5, -2.0)
'''

TEST_LAYOUT = r'''import pytest

from __PKG__.layout import canvas_size, dash_points, describe, direction, polygon_from_text, total_area
from __PKG__.shapes import Polygon

SQUARE = Polygon([(0, 0), (2, 0), (2, 2), (0, 2)])


def test_total_area():
    assert total_area([SQUARE, Polygon([(0, 0), (4, 0), (0, 3)])]) == 10.0


def test_dash_points_single_cut():
    assert dash_points((0, 0), (4, 0), 2) == [(2.0, 0.0)]


def test_direction_along_x():
    assert direction((0, 0), (1, 0)) == (1.0, 0.0)


def test_polygon_from_text():
    assert polygon_from_text("0,0 4,0 0,3").points == [(0.0, 0.0), (4.0, 0.0), (0.0, 3.0)]


def test_describe_counts_vertices_and_area():
    assert describe(SQUARE).startswith("4 vertices, area 4.00")
'''

SITES = (
    BugSite(
        kind="off_by_one", module="shapes.py", function="Polygon.edges",
        fixed="for i in range(n)]", buggy="for i in range(n - 1)]",
        entry_module="layout.py", entry_function="describe", test_file="tests/test_layout.py",
        tests=r'''
def test_describe_includes_the_closing_edge_in_the_perimeter():
    triangle = Polygon([(0, 0), (4, 0), (0, 3)])
    assert "perimeter 12.00" in describe(triangle)
''',
        breaks=("tests/test_shapes.py::test_perimeter",),
        title="describe() reports the wrong perimeter for a 3-4-5 triangle",
        story="I cut shapes out of plywood and use the perimeter to order edge banding. For a right "
              "triangle with sides 3, 4 and 5 the perimeter should be 12.",
        snippet=r'''from __PKG__ import Polygon, describe

print(describe(Polygon([(0, 0), (4, 0), (0, 3)])))
''',
        expected="`perimeter 12.00`",
        actual="`perimeter 9.00`",
    ),
    BugSite(
        kind="wrong_operator", module="vectors.py", function="cross",
        fixed="return a[0] * b[1] - a[1] * b[0]", buggy="return a[0] * b[1] + a[1] * b[0]",
        entry_module="layout.py", entry_function="total_area", test_file="tests/test_layout.py",
        tests=r'''
def test_total_area_of_a_rectangle_away_from_the_origin():
    rectangle = Polygon([(1, 1), (3, 1), (3, 2), (1, 2)])
    assert total_area([rectangle]) == 2.0
''',
        title="total_area() is wrong for shapes that are not at the origin",
        story="A 2 x 1 rectangle placed at (1, 1) on the canvas gets an area of 12. The same rectangle at "
              "the origin is fine.",
        snippet=r'''from __PKG__ import Polygon, total_area

print(total_area([Polygon([(1, 1), (3, 1), (3, 2), (1, 2)])]))
''',
        expected="`2.0`",
        actual="`12.0`",
    ),
    BugSite(
        kind="wrong_default", module="shapes.py", function="bounding_box",
        fixed="def bounding_box(points, margin=0.0):", buggy="def bounding_box(points, margin=1.0):",
        entry_module="layout.py", entry_function="canvas_size", test_file="tests/test_layout.py",
        tests=r'''
def test_canvas_size_is_tight():
    assert canvas_size([SQUARE]) == (2.0, 2.0)
''',
        title="canvas_size() adds 2 units to every side length",
        story="We size the SVG canvas with `canvas_size()`. Every drawing comes out with a border we never "
              "asked for.",
        snippet=r'''from __PKG__ import Polygon, canvas_size

print(canvas_size([Polygon([(0, 0), (2, 0), (2, 2), (0, 2)])]))
''',
        expected="`(2.0, 2.0)`",
        actual="`(4.0, 4.0)`",
    ),
    BugSite(
        kind="missing_edge_case", module="shapes.py", function="bounding_box",
        fixed="    if not points:\n        return ((0.0, 0.0), (0.0, 0.0))\n", buggy="",
        entry_module="layout.py", entry_function="canvas_size", test_file="tests/test_layout.py",
        tests=r'''
def test_canvas_size_of_an_empty_drawing():
    assert canvas_size([]) == (0.0, 0.0)
''',
        title="canvas_size() crashes for an empty drawing",
        story="A new drawing has no shapes yet, and opening it in our editor crashes while sizing the canvas.",
        snippet=r'''from __PKG__ import canvas_size

print(canvas_size([]))
''',
        expected="`(0.0, 0.0)`",
        actual="`ValueError: min() arg is an empty sequence`",
    ),
    BugSite(
        kind="swapped_arguments", module="shapes.py", function="split_edge",
        fixed="return lerp(a, b, fraction)", buggy="return lerp(b, a, fraction)",
        entry_module="layout.py", entry_function="dash_points", test_file="tests/test_layout.py",
        tests=r'''
def test_dash_points_run_from_start_to_end():
    assert dash_points((0, 0), (4, 0), 4) == [(1.0, 0.0), (2.0, 0.0), (3.0, 0.0)]
''',
        title="dash_points() returns the points from the far end first",
        story="We draw dashed lines with `dash_points()`. The docstring says the points come in order from "
              "the start, but the animation runs backwards.",
        snippet=r'''from __PKG__ import dash_points

print(dash_points((0, 0), (4, 0), 4))
''',
        expected="`[(1.0, 0.0), (2.0, 0.0), (3.0, 0.0)]`",
        actual="`[(3.0, 0.0), (2.0, 0.0), (1.0, 0.0)]`",
    ),
    BugSite(
        kind="wrong_return", module="vectors.py", function="normalize",
        fixed="    unit = (v[0] / n, v[1] / n)\n    return unit\n",
        buggy="    unit = (v[0] / n, v[1] / n)\n    return v\n",
        entry_module="layout.py", entry_function="direction", test_file="tests/test_layout.py",
        tests=r'''
def test_direction_is_a_unit_vector():
    assert direction((0, 0), (3, 4)) == (0.6, 0.8)
''',
        title="direction() does not return a unit vector",
        story="Our arrows are drawn with `direction()`, which the docs describe as a unit vector, but long "
              "arrows fly off the canvas.",
        snippet=r'''from __PKG__ import direction

print(direction((0, 0), (3, 4)))
''',
        expected="`(0.6, 0.8)`",
        actual="`(3, 4)`",
    ),
    BugSite(
        kind="exception_handling", module="shapes.py", function="parse_point",
        fixed="    except ValueError:\n        raise ValueError(f\"bad point {text!r}: expected 'x,y'\") from None\n",
        buggy="    except ValueError:\n        return (0.0, 0.0)\n",
        entry_module="layout.py", entry_function="polygon_from_text", test_file="tests/test_layout.py",
        tests=r'''
def test_polygon_from_text_rejects_bad_points():
    with pytest.raises(ValueError, match="bad point"):
        polygon_from_text("0,0 4;0 0,3")
''',
        title="A typo in polygon text silently becomes a point at the origin",
        story="Shapes come from a text file our users edit by hand. A point typed as '4;0' instead of "
              "'4,0' gave a broken shape instead of an error.",
        snippet=r'''from __PKG__ import polygon_from_text

print(polygon_from_text("0,0 4;0 0,3").points)
''',
        expected="a `ValueError` that points at the bad point `'4;0'`",
        actual="no error: `[(0.0, 0.0), (0.0, 0.0), (0.0, 3.0)]`",
    ),
    BugSite(
        kind="string_formatting", module="vectors.py", function="fmt_point",
        fixed='return f"({p[0]:.{digits}f}, {p[1]:.{digits}f})"', buggy='return f"({p[0]:.{digits}g}, {p[1]:.{digits}g})"',
        entry_module="layout.py", entry_function="describe", test_file="tests/test_layout.py",
        tests=r'''
def test_describe_prints_the_centroid_with_two_decimals():
    triangle = Polygon([(0, 0), (4, 0), (0, 3)])
    assert describe(triangle).endswith("centroid (1.33, 1.00)")
''',
        breaks=("tests/test_vectors.py::test_fmt_point[two]",),
        title="describe() prints the centroid with the wrong number of decimals",
        story="All numbers in `describe()` have two decimals except the centroid, which breaks the column "
              "layout of our shape report.",
        snippet=r'''from __PKG__ import Polygon, describe

print(describe(Polygon([(0, 0), (4, 0), (0, 3)])))
''',
        expected="`centroid (1.33, 1.00)`",
        actual="`centroid (1.3, 1)`",
    ),
)

TEMPLATE = Template(
    name="geometry",
    packages=("planegeo", "flatshapes", "polykit"),
    description="Plane geometry: vectors, polygons and laying shapes out on a canvas.",
    context="We use __PKG__ in a small drawing tool for laser-cut parts.",
    modules={"vectors.py": VECTORS, "shapes.py": SHAPES, "layout.py": LAYOUT},
    exports={"shapes.py": ("Polygon",),
             "layout.py": ("canvas_size", "dash_points", "describe", "direction", "polygon_from_text", "total_area")},
    tests={"tests/test_vectors.py": TEST_VECTORS, "tests/test_shapes.py": TEST_SHAPES, "tests/test_layout.py": TEST_LAYOUT},
    sites=SITES,
)
