"""Template: a bank-account ledger (money helpers, accounts, everyday operations)."""

from ..model import BugSite, Template

MONEY = r'''"""Money amounts as Decimal, rounded to cents."""

from decimal import ROUND_HALF_UP, Decimal, InvalidOperation

CENT = Decimal("0.01")


def to_money(value):
    """Parse 12, "12.5" or "$1,200.00" into a Decimal rounded to cents."""
    text = str(value).replace("$", "").replace(",", "").strip()
    try:
        amount = Decimal(text)
    except InvalidOperation:
        raise ValueError(f"not an amount: {value!r}") from None
    rounded = amount.quantize(CENT, rounding=ROUND_HALF_UP)
    return rounded


def format_money(amount, symbol="$"):
    """"$12.50", "-$1,200.00"."""
    sign = "-" if amount < 0 else ""
    return f"{sign}{symbol}{abs(amount):,.2f}"
'''

ACCOUNTS = r'''"""Accounts: a list of entries, a balance, and what can still be withdrawn."""

from decimal import Decimal

from .money import format_money, to_money


class InsufficientFunds(Exception):
    """Raised when a withdrawal is more than the account has available."""


class Account:
    def __init__(self, name, overdraft="0.00"):
        self.name = name
        self.overdraft = to_money(overdraft)
        self.entries = []  # (description, signed amount)

    def deposit(self, amount, description="deposit"):
        amount = to_money(amount)
        if amount <= 0:
            raise ValueError("a deposit must be positive")
        self.entries.append((description, amount))

    def withdraw(self, amount, description="withdrawal"):
        amount = to_money(amount)
        if amount <= 0:
            raise ValueError("a withdrawal must be positive")
        if amount > self.available():
            raise InsufficientFunds(
                f"{self.name}: {format_money(amount)} is more than the {format_money(self.available())} available"
            )
        self.entries.append((description, -amount))

    def balance(self):
        return sum((amount for _, amount in self.entries), Decimal("0.00"))

    def available(self):
        """What can still be withdrawn: the balance plus the overdraft limit."""
        return self.balance() + self.overdraft

    def history(self, limit=None):
        """The entries, oldest first; only the last `limit` ones when given."""
        return list(self.entries) if limit is None else list(self.entries[-limit:])

    def largest_withdrawal(self):
        withdrawals = [-amount for _, amount in self.entries if amount < 0]
        if not withdrawals:
            return Decimal("0.00")
        return max(withdrawals)

    def pay(self, other, amount):
        """Pay `amount` from this account to `other`."""
        transfer(self, other, amount)


def transfer(source, target, amount):
    """Move `amount` from `source` to `target`; nothing moves when the source cannot pay."""
    source.withdraw(amount, f"transfer to {target.name}")
    target.deposit(amount, f"transfer from {source.name}")
'''

OPERATIONS = r'''"""Everyday operations: paying invoices, moving savings, bulk deposits, statements."""

from .accounts import transfer
from .money import format_money


def pay_invoice(payer, supplier, amount):
    """Pay a supplier's invoice; returns the payer's new balance."""
    payer.pay(supplier, amount)
    return payer.balance()


def move_savings(source, target, amount):
    """Move money between two of our own accounts."""
    transfer(source, target, amount)


def deposit_all(account, amounts):
    """Deposit every amount in order; returns the new balance."""
    for amount in amounts:
        account.deposit(amount)
    return account.balance()


def statement(account):
    """Every entry of the account, then its balance and its largest withdrawal."""
    lines = [f"{description}: {format_money(amount)}" for description, amount in account.history()]
    lines.append(f"balance: {format_money(account.balance())}")
    lines.append(f"largest withdrawal: {format_money(account.largest_withdrawal())}")
    return lines
'''

TEST_MONEY = r'''from decimal import Decimal

import pytest

from __PKG__.money import format_money, to_money


@pytest.mark.parametrize("value, expected", [("12.50", Decimal("12.50")), ("$1,200", Decimal("1200")), (7, Decimal("7"))],
                         ids=["plain", "dollars-and-commas", "int"])
def test_to_money(value, expected):
    assert to_money(value) == expected


def test_format_money_small_amounts():
    assert format_money(Decimal("12.5")) == "$12.50"
    assert format_money(Decimal("-3")) == "-$3.00"
'''

TEST_ACCOUNTS = r'''from decimal import Decimal

import pytest

from __PKG__.accounts import Account, InsufficientFunds, transfer


def test_deposit_and_withdraw():
    account = Account("current")
    account.deposit("100")
    account.withdraw("30.25")
    assert account.balance() == Decimal("69.75")


def test_deposit_must_be_positive():
    with pytest.raises(ValueError):
        Account("current").deposit(0)


def test_cannot_overdraw_without_overdraft():
    account = Account("current")
    account.deposit("10")
    with pytest.raises(InsufficientFunds):
        account.withdraw("10.01")


def test_transfer():
    a, b = Account("a"), Account("b")
    a.deposit("50")
    transfer(a, b, "20")
    assert (a.balance(), b.balance()) == (Decimal("30"), Decimal("20"))


def test_history_limit():
    account = Account("current")
    for amount in ("1", "2", "3"):
        account.deposit(amount)
    assert [amount for _, amount in account.history(limit=2)] == [Decimal("2"), Decimal("3")]


def test_largest_withdrawal():
    account = Account("current")
    account.deposit("100")
    account.withdraw("10")
    account.withdraw("25")
    assert account.largest_withdrawal() == Decimal("25")
'''

TEST_OPERATIONS = r'''from decimal import Decimal

import pytest

from __PKG__.accounts import Account
from __PKG__.operations import deposit_all, move_savings, pay_invoice, statement


def test_statement():
    account = Account("current")
    account.deposit("100")
    account.withdraw("40", "groceries")
    assert statement(account) == [
        "deposit: $100.00", "groceries: -$40.00", "balance: $60.00", "largest withdrawal: $40.00",
    ]


def test_deposit_all():
    assert deposit_all(Account("current"), ["1.50", "2.25"]) == Decimal("3.75")


def test_move_savings():
    a, b = Account("a"), Account("b")
    a.deposit("80")
    move_savings(a, b, "30")
    assert b.balance() == Decimal("30")
'''

SITES = (
    BugSite(
        kind="off_by_one", module="accounts.py", function="Account.withdraw",
        fixed="        if amount > self.available():\n", buggy="        if amount >= self.available():\n",
        entry_module="operations.py", entry_function="move_savings", test_file="tests/test_operations.py",
        tests=r'''
def test_moving_the_whole_balance_is_allowed():
    current, savings = Account("current"), Account("savings")
    current.deposit("100.00")
    move_savings(current, savings, "100.00")
    assert current.balance() == Decimal("0.00")
    assert savings.balance() == Decimal("100.00")
''',
        title="Cannot move the entire balance of an account",
        story="At the end of the month I move everything left on our current account to savings. That "
              "fails with InsufficientFunds, although the amount is exactly the balance.",
        snippet=r'''from __PKG__ import Account, move_savings

current, savings = Account("current"), Account("savings")
current.deposit("100.00")
move_savings(current, savings, "100.00")
print(current.balance(), savings.balance())
''',
        expected="the move to go through and print `0.00 100.00`",
        actual="`InsufficientFunds: current: $100.00 is more than the $100.00 available`",
    ),
    BugSite(
        kind="wrong_operator", module="accounts.py", function="Account.available",
        fixed="return self.balance() + self.overdraft", buggy="return self.balance() - self.overdraft",
        entry_module="operations.py", entry_function="move_savings", test_file="tests/test_operations.py",
        tests=r'''
def test_overdraft_can_be_used():
    current = Account("current", overdraft="50.00")
    savings = Account("savings")
    current.deposit("20.00")
    move_savings(current, savings, "60.00")
    assert current.balance() == Decimal("-40.00")
''',
        title="Overdraft limit makes withdrawals fail instead of allowing them",
        story="Our current account has a 50.00 overdraft. With 20.00 on it, moving 60.00 should be fine, "
              "but it is refused; the bigger the overdraft, the less we can move.",
        snippet=r'''from __PKG__ import Account, move_savings

current = Account("current", overdraft="50.00")
current.deposit("20.00")
move_savings(current, Account("savings"), "60.00")
print(current.balance())
''',
        expected="the move to go through and print `-40.00`",
        actual="`InsufficientFunds: current: $60.00 is more than the -$30.00 available`",
    ),
    BugSite(
        kind="wrong_default", module="accounts.py", function="Account.history",
        fixed="def history(self, limit=None):", buggy="def history(self, limit=10):",
        entry_module="operations.py", entry_function="statement", test_file="tests/test_operations.py",
        tests=r'''
def test_statement_lists_every_entry():
    account = Account("current")
    for i in range(1, 13):
        account.deposit(i)
    lines = statement(account)
    assert len(lines) == 14
    assert lines[0] == "deposit: $1.00"
''',
        title="statement() drops the oldest entries of busy accounts",
        story="Our monthly statement should list every entry, but for accounts with many entries the first "
              "ones are missing, so the lines do not add up to the balance.",
        snippet=r'''from __PKG__ import Account, statement

account = Account("current")
for i in range(1, 13):
    account.deposit(i)
print(len(statement(account)))
''',
        expected="`14` (12 entries, the balance and the largest withdrawal)",
        actual="`12`; the deposits of 1.00 and 2.00 are not listed",
    ),
    BugSite(
        kind="missing_edge_case", module="accounts.py", function="Account.largest_withdrawal",
        fixed="        if not withdrawals:\n            return Decimal(\"0.00\")\n", buggy="",
        entry_module="operations.py", entry_function="statement", test_file="tests/test_operations.py",
        tests=r'''
def test_statement_without_withdrawals():
    account = Account("savings")
    account.deposit("25.00")
    assert statement(account)[-1] == "largest withdrawal: $0.00"
''',
        title="statement() crashes for an account that only has deposits",
        story="A brand-new savings account with a single deposit cannot produce a statement.",
        snippet=r'''from __PKG__ import Account, statement

account = Account("savings")
account.deposit("25.00")
print(statement(account))
''',
        expected="the statement, ending with `largest withdrawal: $0.00`",
        actual="`ValueError: max() arg is an empty sequence`",
    ),
    BugSite(
        kind="swapped_arguments", module="accounts.py", function="Account.pay",
        fixed="        transfer(self, other, amount)\n", buggy="        transfer(other, self, amount)\n",
        entry_module="operations.py", entry_function="pay_invoice", test_file="tests/test_operations.py",
        tests=r'''
def test_pay_invoice_moves_money_to_the_supplier():
    shop, supplier = Account("shop"), Account("supplier")
    shop.deposit("100.00")
    supplier.deposit("50.00")
    assert pay_invoice(shop, supplier, "30.00") == Decimal("70.00")
    assert supplier.balance() == Decimal("80.00")
''',
        title="pay_invoice() takes the money from the supplier instead of paying them",
        story="We paid a 30.00 invoice and our balance went *up* by 30.00 while the supplier's went down.",
        snippet=r'''from __PKG__ import Account, pay_invoice

shop, supplier = Account("shop"), Account("supplier")
shop.deposit("100.00")
supplier.deposit("50.00")
print(pay_invoice(shop, supplier, "30.00"), supplier.balance())
''',
        expected="`70.00 80.00`",
        actual="`130.00 20.00`",
    ),
    BugSite(
        kind="wrong_return", module="money.py", function="to_money",
        fixed="    return rounded\n", buggy="    return amount\n",
        entry_module="operations.py", entry_function="deposit_all", test_file="tests/test_operations.py",
        tests=r'''
def test_deposit_all_rounds_each_amount_to_cents():
    account = Account("current")
    assert deposit_all(account, ["10.005", "5.125"]) == Decimal("15.14")
''',
        title="Balances keep fractions of a cent",
        story="We import card payments that come with three decimals. The docs say every amount is "
              "rounded to cents on the way in, but the balance ends up with a third decimal.",
        snippet=r'''from __PKG__ import Account, deposit_all

print(deposit_all(Account("current"), ["10.005", "5.125"]))
''',
        expected="`15.14` (10.01 + 5.13)",
        actual="`15.130`",
    ),
    BugSite(
        kind="exception_handling", module="money.py", function="to_money",
        fixed="    except InvalidOperation:\n        raise ValueError(f\"not an amount: {value!r}\") from None\n",
        buggy="    except InvalidOperation:\n        return Decimal(\"0.00\")\n",
        entry_module="operations.py", entry_function="deposit_all", test_file="tests/test_operations.py",
        tests=r'''
def test_deposit_all_rejects_words():
    account = Account("current")
    with pytest.raises(ValueError, match="not an amount"):
        deposit_all(account, ["12.00", "twelve"])
''',
        title="Misleading error for a typo in an amount",
        story="One line of our import file said 'twelve' instead of 12.00. The error we got talks about "
              "deposits having to be positive, which sent us looking in the wrong place.",
        snippet=r'''from __PKG__ import Account, deposit_all

deposit_all(Account("current"), ["12.00", "twelve"])
''',
        expected="a `ValueError` saying that `'twelve'` is not an amount",
        actual="`ValueError: a deposit must be positive`",
    ),
    BugSite(
        kind="string_formatting", module="money.py", function="format_money",
        fixed="{abs(amount):,.2f}", buggy="{abs(amount):.2f}",
        entry_module="operations.py", entry_function="statement", test_file="tests/test_operations.py",
        tests=r'''
def test_statement_groups_thousands():
    account = Account("current")
    account.deposit("1200.50")
    assert statement(account)[1] == "balance: $1,200.50"
''',
        title="Amounts of 1,000 and more are printed without a thousands separator",
        story="The statements we send to customers show '$1200.50'; the docs (and our customers) expect "
              "'$1,200.50'.",
        snippet=r'''from __PKG__ import Account, statement

account = Account("current")
account.deposit("1200.50")
print(statement(account)[1])
''',
        expected="`balance: $1,200.50`",
        actual="`balance: $1200.50`",
    ),
)

TEMPLATE = Template(
    name="ledger",
    packages=("ledgerly", "pennybook", "tallyho"),
    description="A small bank-account ledger: accounts, transfers, statements.",
    context="We run the books of our sports club with __PKG__.",
    modules={"money.py": MONEY, "accounts.py": ACCOUNTS, "operations.py": OPERATIONS},
    exports={"accounts.py": ("Account", "InsufficientFunds"),
             "operations.py": ("deposit_all", "move_savings", "pay_invoice", "statement")},
    tests={"tests/test_money.py": TEST_MONEY, "tests/test_accounts.py": TEST_ACCOUNTS,
           "tests/test_operations.py": TEST_OPERATIONS},
    sites=SITES,
)
