"""Template: a small inventory library (stock book, reports, unit helpers)."""

from ..model import BugSite, Template

UNITS = r'''"""Small helpers shared by the inventory modules: quantities, money, SKU codes."""

TAX_RATE = 0.2


def round_money(amount):
    """Round a money amount to cents."""
    return round(amount + 0.0, 2)


def normalize_sku(sku):
    """SKUs are compared without surrounding spaces and in upper case."""
    cleaned = sku.strip().upper()
    return cleaned


def parse_quantity(text, default=0):
    """Parse a quantity such as "12" or "3 units"; blank text means `default`."""
    text = text.strip()
    if not text:
        return default
    number = text.split()[0]
    try:
        return int(number)
    except ValueError:
        raise ValueError(f"not a quantity: {text!r}") from None


def with_tax(amount, rate=TAX_RATE):
    """The amount with tax at `rate` added."""
    return round_money(amount * (1 + rate))


def mean(values):
    """The arithmetic mean of `values`; 0.0 for no values."""
    values = list(values)
    if not values:
        return 0.0
    return sum(values) / len(values)


def percent(part, whole):
    """`part` as a percentage of `whole`, to one decimal place."""
    return round(100.0 * part / whole, 1)


def format_sku(prefix, number):
    """A SKU code: the prefix in upper case, a dash, the number zero-padded to 5 digits."""
    return f"{prefix.upper()}-{number:05d}"
'''

STOCK = r'''"""The stock book: what is on the shelf, and at what unit price."""

from .units import format_sku, normalize_sku, parse_quantity, percent, round_money


class OutOfStock(Exception):
    """Raised when taking more units than are on the shelf."""


class Stock:
    """Quantities and unit prices by SKU."""

    def __init__(self):
        self._items = {}  # sku -> [quantity, unit_price]

    def add(self, sku, quantity, unit_price):
        if quantity < 0:
            raise ValueError("quantity must be >= 0")
        entry = self._items.setdefault(normalize_sku(sku), [0, unit_price])
        entry[0] += quantity
        entry[1] = unit_price

    def add_from_text(self, sku, text, unit_price):
        """Add a quantity typed by a person ("12", "3 units", or blank for none)."""
        self.add(sku, parse_quantity(text), unit_price)

    def remove(self, sku, quantity):
        sku = normalize_sku(sku)
        if sku not in self._items:
            raise KeyError(sku)
        entry = self._items[sku]
        if quantity > entry[0]:
            raise OutOfStock(f"only {entry[0]} of {sku} left")
        entry[0] -= quantity

    def quantity(self, sku):
        return self._items.get(normalize_sku(sku), [0, 0.0])[0]

    def value(self, sku):
        quantity, price = self._items[normalize_sku(sku)]
        return round_money(quantity * price)

    def total_value(self):
        return round_money(sum(self.value(sku) for sku in self._items))

    def skus(self):
        return sorted(self._items)

    def unit_prices(self):
        return [price for _, price in self._items.values()]

    def needs_reorder(self, sku, level=5):
        """True when the quantity has fallen to the reorder level or below."""
        return self.quantity(sku) <= level

    def share(self, sku):
        """The percentage of the total stock value held in `sku`."""
        return percent(self.value(sku), self.total_value())

    def new_sku(self, prefix):
        """A fresh SKU code for the next item added under `prefix`."""
        return format_sku(prefix, len(self._items) + 1)
'''

REPORT = r'''"""Reports over a Stock, for the weekly stock take."""

from .units import mean, with_tax


def total_value(stock, taxed=False):
    """The value of everything on the shelf, optionally with tax."""
    total = stock.total_value()
    return with_tax(total) if taxed else total


def average_price(stock):
    """The mean unit price over all SKUs (0.0 for an empty stock)."""
    return round(mean(stock.unit_prices()), 2)


def reorder_list(stock, level=5):
    """SKUs to order again: those at or below `level` units."""
    return [sku for sku in stock.skus() if stock.needs_reorder(sku, level)]


def value_breakdown(stock):
    """One line per SKU with its share of the total value."""
    return [f"{sku}: {stock.share(sku)}%" for sku in stock.skus()]
'''

TEST_UNITS = r'''import pytest

from __PKG__.units import format_sku, mean, normalize_sku, parse_quantity, percent, round_money, with_tax


def test_round_money():
    assert round_money(1 / 3) == 0.33
    assert round_money(7) == 7.0


def test_parse_quantity():
    assert parse_quantity("12") == 12
    assert parse_quantity(" 3 units ") == 3
    assert parse_quantity("", default=7) == 7


def test_with_tax_zero_rate():
    assert with_tax(10.0, rate=0.0) == 10.0


def test_mean():
    assert mean([1, 2, 3, 6]) == 3.0


@pytest.mark.parametrize("part, whole, expected", [(1, 4, 25.0), (1, 3, 33.3), (2, 2, 100.0)],
                         ids=["quarter", "third", "all"])
def test_percent(part, whole, expected):
    assert percent(part, whole) == expected


def test_format_sku_long_numbers():
    assert format_sku("ab", 12345) == "AB-12345"


def test_normalize_sku_keeps_clean_codes():
    assert normalize_sku("BOLT") == "BOLT"
'''

TEST_STOCK = r'''import pytest

from __PKG__.stock import OutOfStock, Stock


def test_add_and_quantity():
    stock = Stock()
    stock.add("BOLT", 10, 0.10)
    stock.add("BOLT", 5, 0.12)
    assert stock.quantity("BOLT") == 15
    assert stock.quantity("NUT") == 0


def test_add_rejects_negative_quantity():
    with pytest.raises(ValueError):
        Stock().add("BOLT", -1, 0.10)


def test_remove():
    stock = Stock()
    stock.add("BOLT", 10, 0.10)
    stock.remove("BOLT", 4)
    assert stock.quantity("BOLT") == 6


def test_remove_too_many():
    stock = Stock()
    stock.add("BOLT", 2, 0.10)
    with pytest.raises(OutOfStock):
        stock.remove("BOLT", 3)


def test_remove_unknown_sku():
    with pytest.raises(KeyError):
        Stock().remove("BOLT", 1)


def test_value():
    stock = Stock()
    stock.add("BOLT", 3, 0.25)
    assert stock.value("BOLT") == 0.75
    assert stock.total_value() == 0.75


def test_add_from_text():
    stock = Stock()
    stock.add_from_text("NUT", "12 pieces", 0.05)
    assert stock.quantity("NUT") == 12


def test_needs_reorder():
    stock = Stock()
    stock.add("BOLT", 2, 0.10)
    stock.add("NUT", 9, 0.05)
    assert stock.needs_reorder("BOLT")
    assert not stock.needs_reorder("NUT")
'''

TEST_REPORT = r'''from __PKG__.report import average_price, reorder_list, total_value, value_breakdown
from __PKG__.stock import Stock


def make_stock():
    stock = Stock()
    stock.add("BOLT", 2, 0.10)
    stock.add("NUT", 9, 0.30)
    return stock


def test_total_value():
    assert total_value(make_stock()) == 2.9


def test_average_price():
    assert average_price(make_stock()) == 0.2


def test_reorder_list():
    assert reorder_list(make_stock()) == ["BOLT"]


def test_value_breakdown_single_item():
    stock = Stock()
    stock.add("BOLT", 4, 0.5)
    assert value_breakdown(stock) == ["BOLT: 100.0%"]
'''

SITES = (
    BugSite(
        kind="off_by_one", module="stock.py", function="Stock.needs_reorder",
        fixed="return self.quantity(sku) <= level", buggy="return self.quantity(sku) < level",
        entry_module="report.py", entry_function="reorder_list", test_file="tests/test_report.py",
        tests=r'''
def test_reorder_list_includes_items_at_the_level():
    stock = Stock()
    stock.add("BOLT", 5, 0.10)
    stock.add("NUT", 40, 0.05)
    assert reorder_list(stock) == ["BOLT"]
    assert reorder_list(stock, level=40) == ["BOLT", "NUT"]
''',
        title="reorder_list() leaves out items that are exactly at the reorder level",
        story="During the weekly stock take I print the reorder list. We had exactly 5 bolts left and "
              "the reorder level is 5, yet bolts were not on the list, so we ran out.",
        snippet=r'''from __PKG__ import Stock, reorder_list

stock = Stock()
stock.add("BOLT", 5, 0.10)
stock.add("NUT", 40, 0.05)
print(reorder_list(stock))
''',
        expected="`['BOLT']` (the docstring says items *at or below* the level are listed)",
        actual="`[]`",
    ),
    BugSite(
        kind="wrong_operator", module="units.py", function="with_tax",
        fixed="return round_money(amount * (1 + rate))", buggy="return round_money(amount * (1 - rate))",
        entry_module="report.py", entry_function="total_value", test_file="tests/test_report.py",
        tests=r'''
def test_total_value_with_tax_adds_the_tax():
    stock = Stock()
    stock.add("DRILL", 2, 50.0)
    assert total_value(stock) == 100.0
    assert total_value(stock, taxed=True) == 120.0
''',
        title="total_value(taxed=True) comes out lower than the untaxed total",
        story="Our accountant asked for the stock value including tax, and the number was smaller than "
              "the value without tax.",
        snippet=r'''from __PKG__ import Stock, total_value

stock = Stock()
stock.add("DRILL", 2, 50.0)
print(total_value(stock), total_value(stock, taxed=True))
''',
        expected="`100.0 120.0` (the default tax rate is 20%)",
        actual="`100.0 80.0`",
    ),
    BugSite(
        kind="wrong_default", module="units.py", function="parse_quantity",
        fixed="def parse_quantity(text, default=0):", buggy="def parse_quantity(text, default=1):",
        entry_module="stock.py", entry_function="Stock.add_from_text", test_file="tests/test_stock.py",
        tests=r'''
def test_add_from_blank_text_adds_nothing():
    stock = Stock()
    stock.add_from_text("WASHER", "   ", 0.02)
    assert stock.quantity("WASHER") == 0
''',
        title="Adding stock from an empty quantity field adds one unit",
        story="Our intake form passes whatever was typed into the quantity box to "
              "`Stock.add_from_text()`. When somebody leaves the box empty, one unit appears in stock.",
        snippet=r'''from __PKG__ import Stock

stock = Stock()
stock.add_from_text("WASHER", "   ", 0.02)
print(stock.quantity("WASHER"))
''',
        expected="`0` (the docstring says blank means none)",
        actual="`1`",
    ),
    BugSite(
        kind="missing_edge_case", module="units.py", function="mean",
        fixed="    values = list(values)\n    if not values:\n        return 0.0\n",
        buggy="    values = list(values)\n",
        entry_module="report.py", entry_function="average_price", test_file="tests/test_report.py",
        tests=r'''
def test_average_price_of_empty_stock_is_zero():
    assert average_price(Stock()) == 0.0
''',
        title="average_price() crashes when the stock is empty",
        story="We run the report for every storage room, and the new room has nothing in it yet.",
        snippet=r'''from __PKG__ import Stock, average_price

print(average_price(Stock()))
''',
        expected="`0.0`, as the docstring promises for an empty stock",
        actual="`ZeroDivisionError: division by zero`",
    ),
    BugSite(
        kind="swapped_arguments", module="stock.py", function="Stock.share",
        fixed="return percent(self.value(sku), self.total_value())",
        buggy="return percent(self.total_value(), self.value(sku))",
        entry_module="report.py", entry_function="value_breakdown", test_file="tests/test_report.py",
        tests=r'''
def test_value_breakdown_shows_each_share_of_the_total():
    stock = Stock()
    stock.add("BOLT", 10, 1.0)
    stock.add("NUT", 30, 1.0)
    assert value_breakdown(stock) == ["BOLT: 25.0%", "NUT: 75.0%"]
''',
        title="value_breakdown() reports shares above 100%",
        story="The value breakdown is supposed to show what part of the stock value each item is. With "
              "more than one item the percentages are way over 100.",
        snippet=r'''from __PKG__ import Stock, value_breakdown

stock = Stock()
stock.add("BOLT", 10, 1.0)
stock.add("NUT", 30, 1.0)
print(value_breakdown(stock))
''',
        expected="`['BOLT: 25.0%', 'NUT: 75.0%']`",
        actual="`['BOLT: 400.0%', 'NUT: 133.3%']`",
    ),
    BugSite(
        kind="wrong_return", module="units.py", function="normalize_sku",
        fixed="    cleaned = sku.strip().upper()\n    return cleaned\n",
        buggy="    cleaned = sku.strip().upper()\n    return sku\n",
        entry_module="stock.py", entry_function="Stock.add", test_file="tests/test_stock.py",
        tests=r'''
def test_skus_are_matched_without_case_or_spaces():
    stock = Stock()
    stock.add(" bolt ", 3, 0.10)
    assert stock.quantity("BOLT") == 3
    assert stock.skus() == ["BOLT"]
''',
        title="Stock treats ' bolt ' and 'BOLT' as different items",
        story="Codes typed by hand often have stray spaces or lower case letters. The docs say SKUs "
              "are matched without either, but an item added as ' bolt ' cannot be found as 'BOLT'.",
        snippet=r'''from __PKG__ import Stock

stock = Stock()
stock.add(" bolt ", 3, 0.10)
print(stock.quantity("BOLT"), stock.skus())
''',
        expected="`3 ['BOLT']`",
        actual="`0 [' bolt ']`",
    ),
    BugSite(
        kind="exception_handling", module="units.py", function="parse_quantity",
        fixed="    except ValueError:\n        raise ValueError(f\"not a quantity: {text!r}\") from None\n",
        buggy="    except ValueError:\n        return default\n",
        entry_module="stock.py", entry_function="Stock.add_from_text", test_file="tests/test_stock.py",
        tests=r'''
def test_add_from_text_rejects_words():
    stock = Stock()
    with pytest.raises(ValueError, match="not a quantity"):
        stock.add_from_text("BOLT", "ten", 0.10)
    assert stock.quantity("BOLT") == 0
''',
        title="A typo in the quantity field is silently stored as zero",
        story="Somebody typed 'ten' instead of '10' on the intake form. No error was raised and the "
              "item went into the stock book with quantity 0, so nobody noticed.",
        snippet=r'''from __PKG__ import Stock

stock = Stock()
stock.add_from_text("BOLT", "ten", 0.10)
print(stock.quantity("BOLT"))
''',
        expected="a `ValueError` saying that 'ten' is not a quantity",
        actual="no error at all; the script prints `0`",
    ),
    BugSite(
        kind="string_formatting", module="units.py", function="format_sku",
        fixed='return f"{prefix.upper()}-{number:05d}"', buggy='return f"{prefix.upper()}-{number:5d}"',
        entry_module="stock.py", entry_function="Stock.new_sku", test_file="tests/test_stock.py",
        tests=r'''
def test_new_sku_is_zero_padded():
    stock = Stock()
    assert stock.new_sku("bolt") == "BOLT-00001"
    stock.add("BOLT-00001", 1, 0.10)
    assert stock.new_sku("nut") == "NUT-00002"
''',
        title="New SKU codes contain spaces instead of leading zeros",
        story="Our label printer chokes on the codes from `Stock.new_sku()` because they contain spaces.",
        snippet=r'''from __PKG__ import Stock

print(repr(Stock().new_sku("bolt")))
''',
        expected="`'BOLT-00001'` (five digits, zero-padded, like our existing labels)",
        actual="`'BOLT-    1'`",
    ),
)

TEMPLATE = Template(
    name="inventory",
    packages=("stockroom", "shelfbook", "partsbin"),
    description="A small inventory library: a stock book, stock-take reports and unit helpers.",
    context="We use __PKG__ to keep track of the spare parts in our workshop.",
    modules={"units.py": UNITS, "stock.py": STOCK, "report.py": REPORT},
    exports={"stock.py": ("OutOfStock", "Stock"),
             "report.py": ("average_price", "reorder_list", "total_value", "value_breakdown")},
    tests={"tests/test_units.py": TEST_UNITS, "tests/test_stock.py": TEST_STOCK, "tests/test_report.py": TEST_REPORT},
    sites=SITES,
)
