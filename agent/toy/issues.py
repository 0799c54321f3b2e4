"""Issue text for a toy task: a bug report in a user's words, never a description of the fix.

Difficulty sets what the report reveals about where the bug is (the rest is the same):

1. names the buggy function and its file ("... in `stockroom/units.py`, `parse_quantity()` ...");
2. names the buggy function only;
3. names neither: the report speaks of the public function the user called, which lives in another
   module than the bug (a helper module), and imports only from the package itself.
"""

from __future__ import annotations

import random

from .model import BugSite

__all__ = ["LEVELS", "issue_text"]

LEVELS: tuple[int, ...] = (1, 2, 3)

_OPENERS = ("{context}", "Hi! {context}", "{context} Thanks for the library.", "Hello! {context}")
_OUTCOMES = (
    "Expected: {expected}\nActual: {actual}",
    "I expected {expected}, but got {actual}.",
    "**Expected behaviour**\n{expected}\n\n**Actual behaviour**\n{actual}",
    "What I expected: {expected}\nWhat happened: {actual}",
)
_POINTER_FILE = (
    "Looking at the source, the problem seems to be in `{function}()` in `{path}`.",
    "I traced it as far as `{function}()` in `{path}`.",
    "The culprit is probably `{function}()` (in `{path}`).",
)
_POINTER_FUNCTION = (
    "I suspect `{function}()` is involved.",
    "It looks like `{function}()` is doing something wrong here.",
    "Maybe `{function}()` is to blame?",
)
_CLOSERS = ("", "Thanks!", "Happy to test a fix.", "Using {package} {version} on Python 3.11.", "Cheers.")
_TITLE_PREFIXES = ("", "", "Bug: ", "[bug] ")


def issue_text(site: BugSite, *, context: str, package: str, version: str, level: int,
               rng: random.Random) -> str:
    """The problem statement of a task with `site`'s bug, at difficulty `level`; `context` is the
    template's sentence on how the reporter uses the package."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    fill = {"package": package, "version": version}
    title = rng.choice(_TITLE_PREFIXES) + site.title
    opener = rng.choice(_OPENERS).format(context=context.replace("__PKG__", package))
    outcome = rng.choice(_OUTCOMES).format(expected=site.expected, actual=site.actual)
    snippet = site.snippet.replace("__PKG__", package).rstrip("\n")
    parts = [title, f"{opener} {site.story}".strip(), f"```python\n{snippet}\n```", outcome]
    path = f"{package}/{site.module}"
    if level == 1:
        parts.append(rng.choice(_POINTER_FILE).format(function=site.function, path=path))
    elif level == 2:
        parts.append(rng.choice(_POINTER_FUNCTION).format(function=site.function))
    if closer := rng.choice(_CLOSERS).format(**fill):
        parts.append(closer)
    return "\n\n".join(parts) + "\n"

