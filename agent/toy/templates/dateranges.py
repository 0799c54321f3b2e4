"""Template: date ranges and a room-booking calendar."""

from ..model import BugSite, Template

DATES = r'''"""Parsing, formatting and arithmetic on datetime.date values."""

import datetime as dt


def parse_date(text):
    """Parse an ISO date such as "2024-05-01"."""
    try:
        return dt.date.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"not a date: {text!r}") from None


def format_date(day, style="iso"):
    """"2024-05-01" (style "iso") or "01/05" (style "short": day/month)."""
    if style == "iso":
        return day.isoformat()
    if style == "short":
        return f"{day.day:02d}/{day.month:02d}"
    raise ValueError(f"unknown date style {style!r}")


def days_between(start, end):
    """Days from `start` to `end` (negative when `end` is earlier)."""
    return (end - start).days


def add_days(day, n):
    return day + dt.timedelta(days=n)


def add_weeks(day, n):
    return add_days(day, n * 7)
'''

RANGES = r'''"""Date ranges with both ends included."""

from .dates import add_days, days_between


class DateRange:
    """The days from `start` to `end`, both included."""

    def __init__(self, start, end):
        if end < start:
            raise ValueError(f"range ends ({end}) before it starts ({start})")
        self.start = start
        self.end = end

    def __eq__(self, other):
        return isinstance(other, DateRange) and (self.start, self.end) == (other.start, other.end)

    def __repr__(self):
        return f"DateRange({self.start}, {self.end})"

    def length(self):
        """The number of days in the range."""
        return days_between(self.start, self.end) + 1

    def days(self):
        out, day = [], self.start
        while day <= self.end:
            out.append(day)
            day = add_days(day, 1)
        return out

    def contains(self, day):
        return self.start <= day <= self.end

    def overlaps(self, other):
        """True when the two ranges share at least one day."""
        return self.start <= other.end and other.start <= self.end

    def intersection(self, other):
        """The days both ranges share, or None."""
        if not self.overlaps(other):
            return None
        common = DateRange(max(self.start, other.start), min(self.end, other.end))
        return common


def merge(ranges):
    """Merge overlapping or adjacent ranges into a sorted list of disjoint ranges."""
    if not ranges:
        return []
    ordered = sorted(ranges, key=lambda r: r.start)
    merged = [ordered[0]]
    for current in ordered[1:]:
        last = merged[-1]
        if current.start <= add_days(last.end, 1):
            merged[-1] = DateRange(last.start, max(last.end, current.end))
        else:
            merged.append(current)
    return merged
'''

BOOKING = r'''"""A booking calendar for one room."""

from .dates import add_weeks, format_date, parse_date
from .ranges import DateRange, merge


class Conflict(Exception):
    """Raised when a booking overlaps an existing one."""


class Calendar:
    def __init__(self):
        self.bookings = []  # (name, DateRange)

    def book(self, name, start, end):
        """Book the room from `start` to `end` (ISO dates, both included)."""
        self._add(name, DateRange(parse_date(start), parse_date(end)))

    def book_weekly(self, name, start, end, weeks):
        """Book the same days every week, `weeks` times, starting with the given week."""
        first = DateRange(parse_date(start), parse_date(end))
        for week in range(weeks):
            self._add(name, DateRange(add_weeks(first.start, week), add_weeks(first.end, week)))

    def _add(self, name, wanted):
        for other_name, taken in self.bookings:
            if taken.overlaps(wanted):
                raise Conflict(f"{name} overlaps {other_name}")
        self.bookings.append((name, wanted))

    def busy_ranges(self):
        return merge([taken for _, taken in self.bookings])

    def busy_days(self):
        return sorted(day for _, taken in self.bookings for day in taken.days())

    def days_taken(self, start, end):
        """How many days from `start` to `end` (ISO dates, both included) are booked."""
        window = DateRange(parse_date(start), parse_date(end))
        total = 0
        for _, taken in self.bookings:
            common = taken.intersection(window)
            if common is not None:
                total += common.length()
        return total

    def describe(self, style="iso"):
        """One line per booking: "name: start - end (N days)"."""
        lines = []
        for name, r in self.bookings:
            n = r.length()
            lines.append(f"{name}: {format_date(r.start, style)} - {format_date(r.end, style)} "
                         f"({n} day{'' if n == 1 else 's'})")
        return lines

    def export(self):
        """CSV lines "name,start,end" with ISO dates."""
        return [f"{name},{format_date(r.start)},{format_date(r.end)}" for name, r in self.bookings]
'''

TEST_DATES = r'''import datetime as dt

import pytest

from __PKG__.dates import add_days, days_between, format_date, parse_date


def test_parse_date():
    assert parse_date(" 2024-02-29 ") == dt.date(2024, 2, 29)


def test_format_date_styles():
    day = dt.date(2024, 11, 23)
    assert format_date(day, "iso") == "2024-11-23"
    assert format_date(day, "short") == "23/11"


def test_format_date_unknown_style():
    with pytest.raises(ValueError):
        format_date(dt.date(2024, 1, 1), "long")


def test_days_between():
    assert days_between(dt.date(2024, 1, 30), dt.date(2024, 2, 2)) == 3


@pytest.mark.parametrize("n, expected", [(1, dt.date(2024, 3, 1)), (-1, dt.date(2024, 2, 28))],
                         ids=["forward", "back"])
def test_add_days(n, expected):
    assert add_days(dt.date(2024, 2, 29), n) == expected
'''

TEST_RANGES = r'''import datetime as dt

import pytest

from __PKG__.ranges import DateRange, merge

D = dt.date


def test_range_must_not_end_before_it_starts():
    with pytest.raises(ValueError):
        DateRange(D(2024, 5, 2), D(2024, 5, 1))


def test_days():
    r = DateRange(D(2024, 5, 30), D(2024, 6, 1))
    assert r.days() == [D(2024, 5, 30), D(2024, 5, 31), D(2024, 6, 1)]


def test_contains():
    r = DateRange(D(2024, 5, 1), D(2024, 5, 3))
    assert r.contains(D(2024, 5, 3))
    assert not r.contains(D(2024, 5, 4))


def test_overlaps_clearly():
    a = DateRange(D(2024, 5, 1), D(2024, 5, 5))
    assert a.overlaps(DateRange(D(2024, 5, 2), D(2024, 5, 3)))
    assert not a.overlaps(DateRange(D(2024, 5, 7), D(2024, 5, 9)))


def test_merge_adjacent():
    a = DateRange(D(2024, 5, 1), D(2024, 5, 2))
    b = DateRange(D(2024, 5, 3), D(2024, 5, 4))
    c = DateRange(D(2024, 5, 9), D(2024, 5, 9))
    assert merge([c, b, a]) == [DateRange(D(2024, 5, 1), D(2024, 5, 4)), c]


def test_single_day_length():
    assert DateRange(D(2024, 5, 1), D(2024, 5, 1)).length() == 1
'''

TEST_BOOKING = r'''import pytest

from __PKG__.booking import Calendar, Conflict


def test_book_and_busy_days():
    cal = Calendar()
    cal.book("alice", "2024-05-01", "2024-05-02")
    assert [d.isoformat() for d in cal.busy_days()] == ["2024-05-01", "2024-05-02"]


def test_overlapping_booking_conflicts():
    cal = Calendar()
    cal.book("alice", "2024-05-01", "2024-05-05")
    with pytest.raises(Conflict):
        cal.book("bob", "2024-05-02", "2024-05-03")


def test_separate_bookings():
    cal = Calendar()
    cal.book("alice", "2024-05-01", "2024-05-02")
    cal.book("bob", "2024-05-10", "2024-05-11")
    assert len(cal.busy_ranges()) == 2


def test_describe_single_day():
    cal = Calendar()
    cal.book("alice", "2024-05-01", "2024-05-01")
    assert cal.describe() == ["alice: 2024-05-01 - 2024-05-01 (1 day)"]


def test_days_taken_inside_window():
    cal = Calendar()
    cal.book("alice", "2024-05-02", "2024-05-02")
    assert cal.days_taken("2024-05-01", "2024-05-07") == 1
'''

SITES = (
    BugSite(
        kind="off_by_one", module="ranges.py", function="DateRange.overlaps",
        fixed="return self.start <= other.end and other.start <= self.end",
        buggy="return self.start < other.end and other.start < self.end",
        entry_module="booking.py", entry_function="Calendar.book", test_file="tests/test_booking.py",
        tests=r'''
def test_bookings_sharing_a_day_conflict():
    cal = Calendar()
    cal.book("alice", "2024-05-01", "2024-05-03")
    with pytest.raises(Conflict):
        cal.book("bob", "2024-05-03", "2024-05-05")
''',
        title="Two bookings can share their first/last day",
        story="Alice booked the room from the 1st to the 3rd of May and Bob from the 3rd to the 5th. Both "
              "bookings were accepted, and on the 3rd they both showed up.",
        snippet=r'''from __PKG__ import Calendar

cal = Calendar()
cal.book("alice", "2024-05-01", "2024-05-03")
cal.book("bob", "2024-05-03", "2024-05-05")
''',
        expected="a `Conflict` on the second booking (ends are included, so both want the 3rd)",
        actual="both bookings are accepted",
    ),
    BugSite(
        kind="wrong_operator", module="dates.py", function="add_weeks",
        fixed="return add_days(day, n * 7)", buggy="return add_days(day, n + 7)",
        entry_module="booking.py", entry_function="Calendar.book_weekly", test_file="tests/test_booking.py",
        tests=r'''
def test_weekly_booking_repeats_every_seven_days():
    cal = Calendar()
    cal.book_weekly("yoga", "2024-05-06", "2024-05-06", 3)
    assert [d.isoformat() for d in cal.busy_days()] == ["2024-05-06", "2024-05-13", "2024-05-20"]
''',
        title="book_weekly() books the wrong days",
        story="Our Monday yoga class is booked with `Calendar.book_weekly()` for three weeks, starting "
              "on Monday the 6th of May. The calendar then shows it on three days in a row, a week later.",
        snippet=r'''from __PKG__ import Calendar

cal = Calendar()
cal.book_weekly("yoga", "2024-05-06", "2024-05-06", 3)
print([d.isoformat() for d in cal.busy_days()])
''',
        expected="`['2024-05-06', '2024-05-13', '2024-05-20']`",
        actual="`['2024-05-13', '2024-05-14', '2024-05-15']`",
    ),
    BugSite(
        kind="wrong_default", module="dates.py", function="format_date",
        fixed='def format_date(day, style="iso"):', buggy='def format_date(day, style="short"):',
        entry_module="booking.py", entry_function="Calendar.export", test_file="tests/test_booking.py",
        tests=r'''
def test_export_uses_iso_dates():
    cal = Calendar()
    cal.book("alice", "2024-05-01", "2024-05-03")
    assert cal.export() == ["alice,2024-05-01,2024-05-03"]
''',
        title="export() writes dates without the year",
        story="We load the CSV from `Calendar.export()` into a spreadsheet. The docstring promises ISO "
              "dates, but the file has day/month only, so the spreadsheet guesses the year.",
        snippet=r'''from __PKG__ import Calendar

cal = Calendar()
cal.book("alice", "2024-05-01", "2024-05-03")
print(cal.export())
''',
        expected="`['alice,2024-05-01,2024-05-03']`",
        actual="`['alice,01/05,03/05']`",
    ),
    BugSite(
        kind="missing_edge_case", module="ranges.py", function="merge",
        fixed="    if not ranges:\n        return []\n", buggy="",
        entry_module="booking.py", entry_function="Calendar.busy_ranges", test_file="tests/test_booking.py",
        tests=r'''
def test_busy_ranges_of_an_empty_calendar():
    assert Calendar().busy_ranges() == []
''',
        title="busy_ranges() crashes on a calendar with no bookings",
        story="The availability page calls `Calendar.busy_ranges()`; for a room nobody has booked yet the "
              "page fails to load.",
        snippet=r'''from __PKG__ import Calendar

print(Calendar().busy_ranges())
''',
        expected="`[]`",
        actual="`IndexError: list index out of range`",
    ),
    BugSite(
        kind="swapped_arguments", module="ranges.py", function="DateRange.length",
        fixed="return days_between(self.start, self.end) + 1", buggy="return days_between(self.end, self.start) + 1",
        entry_module="booking.py", entry_function="Calendar.describe", test_file="tests/test_booking.py",
        tests=r'''
def test_describe_counts_days():
    cal = Calendar()
    cal.book("meeting", "2024-05-01", "2024-05-03")
    assert cal.describe() == ["meeting: 2024-05-01 - 2024-05-03 (3 days)"]
''',
        title="describe() shows a negative number of days for bookings longer than one day",
        story="Single-day bookings look right in `Calendar.describe()`, but a three-day meeting is listed "
              "as lasting -1 days.",
        snippet=r'''from __PKG__ import Calendar

cal = Calendar()
cal.book("meeting", "2024-05-01", "2024-05-03")
print(cal.describe())
''',
        expected="`['meeting: 2024-05-01 - 2024-05-03 (3 days)']`",
        actual="`['meeting: 2024-05-01 - 2024-05-03 (-1 days)']`",
    ),
    BugSite(
        kind="wrong_return", module="ranges.py", function="DateRange.intersection",
        fixed="        return common\n", buggy="        return self\n",
        entry_module="booking.py", entry_function="Calendar.days_taken", test_file="tests/test_booking.py",
        tests=r'''
def test_days_taken_counts_only_days_inside_the_window():
    cal = Calendar()
    cal.book("alice", "2024-05-01", "2024-05-10")
    assert cal.days_taken("2024-05-08", "2024-05-12") == 3
''',
        title="days_taken() counts days outside the window I ask about",
        story="For our occupancy report I ask how many days of a given week are booked. A long booking "
              "that only overlaps the end of the week is counted in full.",
        snippet=r'''from __PKG__ import Calendar

cal = Calendar()
cal.book("alice", "2024-05-01", "2024-05-10")
print(cal.days_taken("2024-05-08", "2024-05-12"))
''',
        expected="`3` (the 8th, 9th and 10th)",
        actual="`10`",
    ),
    BugSite(
        kind="exception_handling", module="dates.py", function="parse_date",
        fixed="    except ValueError:\n        raise ValueError(f\"not a date: {text!r}\") from None\n",
        buggy="    except ValueError:\n        return None\n",
        entry_module="booking.py", entry_function="Calendar.book", test_file="tests/test_booking.py",
        tests=r'''
def test_book_rejects_bad_dates():
    with pytest.raises(ValueError, match="not a date"):
        Calendar().book("alice", "2024-13-01", "2024-13-02")
''',
        title="Booking with an invalid date raises a confusing TypeError",
        story="A user typed month 13 in the booking form. Instead of a clear message about the date we "
              "got a TypeError about comparing None.",
        snippet=r'''from __PKG__ import Calendar

Calendar().book("alice", "2024-13-01", "2024-13-02")
''',
        expected="a `ValueError` saying that `'2024-13-01'` is not a date",
        actual="`TypeError: '<' not supported between instances of 'NoneType' and 'NoneType'`",
    ),
    BugSite(
        kind="string_formatting", module="dates.py", function="format_date",
        fixed='return f"{day.day:02d}/{day.month:02d}"', buggy='return f"{day.day}/{day.month}"',
        entry_module="booking.py", entry_function="Calendar.describe", test_file="tests/test_booking.py",
        tests=r'''
def test_describe_short_style_pads_day_and_month():
    cal = Calendar()
    cal.book("alice", "2024-05-01", "2024-05-01")
    assert cal.describe(style="short") == ["alice: 01/05 - 01/05 (1 day)"]
''',
        title="describe(style='short') drops the leading zeros",
        story="On the door display we use the short style, documented as '01/05'. Early days of a month "
              "come out as '1/5', which misaligns the list.",
        snippet=r'''from __PKG__ import Calendar

cal = Calendar()
cal.book("alice", "2024-05-01", "2024-05-01")
print(cal.describe(style="short"))
''',
        expected="`['alice: 01/05 - 01/05 (1 day)']`",
        actual="`['alice: 1/5 - 1/5 (1 day)']`",
    ),
)

TEMPLATE = Template(
    name="dateranges",
    packages=("spanlib", "daybook", "roomdates"),
    description="Date ranges and a simple room-booking calendar.",
    context="Our community centre books its meeting room with __PKG__.",
    modules={"dates.py": DATES, "ranges.py": RANGES, "booking.py": BOOKING},
    exports={"booking.py": ("Calendar", "Conflict"), "ranges.py": ("DateRange",)},
    tests={"tests/test_dates.py": TEST_DATES, "tests/test_ranges.py": TEST_RANGES, "tests/test_booking.py": TEST_BOOKING},
    sites=SITES,
)
