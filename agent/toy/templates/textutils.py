"""Template: text utilities (character helpers, word measures, rendering)."""

from ..model import BugSite, Template

CHARS = r'''"""Character-level helpers used by the word and rendering modules."""


def is_vowel(ch):
    return ch.lower() in "aeiou"


def collapse_spaces(text):
    """Replace every run of whitespace with one space and strip both ends."""
    cleaned = " ".join(text.split())
    return cleaned


def clip(text, width, marker="..."):
    """Cut `text` to at most `width` characters, ending with `marker` when it was cut."""
    if len(text) <= width:
        return text
    return text[: width - len(marker)] + marker


def count_vowels(word):
    return sum(1 for ch in word if is_vowel(ch))


def ratio(part, whole):
    """`part / whole`, or 0.0 when `whole` is 0."""
    if whole == 0:
        return 0.0
    return part / whole


def to_int(text, name):
    """Parse an integer setting; a bad value raises ValueError naming the setting."""
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {text!r}") from None


def format_count(n, noun):
    """"1 word", "2 words", "12,345 words"."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
'''

WORDS = r'''"""Splitting text into words, and word-level measures."""

from .chars import collapse_spaces, count_vowels, ratio

SMALL_WORDS = ("a", "an", "and", "the", "of", "in", "on")


def words(text):
    """The words of `text`, split on whitespace."""
    cleaned = collapse_spaces(text)
    return cleaned.split(" ") if cleaned else []


def word_count(text):
    return len(words(text))


def average_length(text):
    """The mean number of letters per word (0.0 when there are no words)."""
    ws = words(text)
    if not ws:
        return 0.0
    return sum(len(w) for w in ws) / len(ws)


def longest_word(text):
    best = ""
    for word in words(text):
        if len(word) > len(best):
            best = word
    return best


def title_case(text, small_words=SMALL_WORDS):
    """Capitalise every word except small words, which stay lower case unless they come first."""
    out = []
    for i, word in enumerate(words(text)):
        if i > 0 and word.lower() in small_words:
            out.append(word.lower())
        else:
            out.append(word[:1].upper() + word[1:].lower())
    return " ".join(out)


def vowel_ratio(word):
    """The share of the letters of `word` that are vowels."""
    return ratio(count_vowels(word), len(word))
'''

RENDER = r'''"""Rendering text for display: headlines, statistics lines, notes on words."""

from .chars import clip, format_count, to_int
from .words import average_length, title_case, vowel_ratio, word_count


def headline(text, width=40):
    """`text` in title case, cut to at most `width` characters."""
    return clip(title_case(text), width)


def headline_for(text, settings):
    """Like `headline`, with the width read from a mapping of strings (an INI section)."""
    width = to_int(settings.get("width", "40"), "width")
    return headline(text, width)


def stats_line(text):
    """"12 words, 4.5 letters per word"."""
    return f"{format_count(word_count(text), 'word')}, {average_length(text):.1f} letters per word"


def describe_word(word):
    """"banana: 6 letters, 50% vowels"."""
    return f"{word}: {format_count(len(word), 'letter')}, {vowel_ratio(word):.0%} vowels"
'''

TEST_CHARS = r'''import pytest

from __PKG__.chars import clip, collapse_spaces, count_vowels, format_count, ratio, to_int


def test_collapse_spaces_clean_text():
    assert collapse_spaces("one two") == "one two"


def test_clip_long_text():
    assert clip("abcdefghij", 6) == "abc..."


def test_clip_short_text():
    assert clip("abc", 10) == "abc"


def test_count_vowels():
    assert count_vowels("Education") == 5


def test_ratio():
    assert ratio(1, 4) == 0.25
    assert ratio(3, 0) == 0.0


def test_to_int():
    assert to_int("42", "width") == 42


@pytest.mark.parametrize("n, expected", [(1, "1 word"), (2, "2 words"), (999, "999 words")],
                         ids=["one", "two", "many"])
def test_format_count(n, expected):
    assert format_count(n, "word") == expected
'''

TEST_WORDS = r'''from __PKG__.words import average_length, longest_word, title_case, vowel_ratio, word_count, words


def test_words():
    assert words("to be or not") == ["to", "be", "or", "not"]
    assert words("") == []


def test_word_count():
    assert word_count("the quick brown fox") == 4


def test_average_length_whole_number():
    assert average_length("ab cd") == 2.0


def test_longest_word():
    assert longest_word("a quick fox") == "quick"


def test_title_case_plain_words():
    assert title_case("hello big world") == "Hello Big World"


def test_title_case_custom_small_words():
    assert title_case("war and peace", small_words=("and",)) == "War and Peace"


def test_vowel_ratio_all_vowels():
    assert vowel_ratio("aei") == 1.0
'''

TEST_RENDER = r'''import pytest

from __PKG__.render import describe_word, headline, headline_for, stats_line


def test_headline_short():
    assert headline("hello world") == "Hello World"


def test_headline_clipped():
    assert headline("a very long headline about nothing", width=12) == "A Very Lo..."


def test_headline_for_reads_width():
    assert headline_for("hello world", {"width": "8"}) == "Hello..."


def test_stats_line():
    assert stats_line("ab cd ef") == "3 words, 2.0 letters per word"


def test_describe_word_all_vowels():
    assert describe_word("aa") == "aa: 2 letters, 100% vowels"
'''

SITES = (
    BugSite(
        kind="off_by_one", module="chars.py", function="clip",
        fixed="    if len(text) <= width:\n", buggy="    if len(text) < width:\n",
        entry_module="render.py", entry_function="headline", test_file="tests/test_render.py",
        tests=r'''
def test_headline_that_fits_exactly_is_not_cut():
    assert headline("hello world", width=11) == "Hello World"
''',
        title="headline() cuts text that fits the width exactly",
        story="Our page header has room for exactly 11 characters, and 'Hello World' is 11 characters "
              "long, but it gets an ellipsis anyway.",
        snippet=r'''from __PKG__ import headline

print(headline("hello world", width=11))
''',
        expected="`Hello World`",
        actual="`Hello Wo...`",
    ),
    BugSite(
        kind="wrong_operator", module="words.py", function="average_length",
        fixed="    return sum(len(w) for w in ws) / len(ws)\n",
        buggy="    return sum(len(w) for w in ws) // len(ws)\n",
        entry_module="render.py", entry_function="stats_line", test_file="tests/test_render.py",
        tests=r'''
def test_stats_line_keeps_the_fraction():
    assert stats_line("a bb ccc dddd") == "4 words, 2.5 letters per word"
''',
        title="stats_line() always shows a whole number of letters per word",
        story="We show reading statistics under each article. The letters-per-word figure always ends "
              "in .0, even when the words clearly do not average out to a whole number.",
        snippet=r'''from __PKG__ import stats_line

print(stats_line("a bb ccc dddd"))
''',
        expected="`4 words, 2.5 letters per word`",
        actual="`4 words, 2.0 letters per word`",
    ),
    BugSite(
        kind="wrong_default", module="words.py", function="title_case",
        fixed="def title_case(text, small_words=SMALL_WORDS):", buggy="def title_case(text, small_words=()):",
        entry_module="render.py", entry_function="headline", test_file="tests/test_render.py",
        tests=r'''
def test_headline_keeps_small_words_lower_case():
    assert headline("the lord of the rings") == "The Lord of the Rings"
''',
        title="headline() capitalises 'of' and 'the' in the middle of a title",
        story="Book titles on our shop front come out as 'The Lord Of The Rings'. The docs say small "
              "words stay lower case unless they come first.",
        snippet=r'''from __PKG__ import headline

print(headline("the lord of the rings"))
''',
        expected="`The Lord of the Rings`",
        actual="`The Lord Of The Rings`",
    ),
    BugSite(
        kind="missing_edge_case", module="words.py", function="average_length",
        fixed="    if not ws:\n        return 0.0\n", buggy="",
        entry_module="render.py", entry_function="stats_line", test_file="tests/test_render.py",
        tests=r'''
def test_stats_line_of_empty_text():
    assert stats_line("") == "0 words, 0.0 letters per word"
''',
        title="stats_line() crashes on an empty article",
        story="Drafts in our CMS can be empty, and rendering the statistics line for one crashes the page.",
        snippet=r'''from __PKG__ import stats_line

print(stats_line(""))
''',
        expected="`0 words, 0.0 letters per word`",
        actual="`ZeroDivisionError: division by zero`",
    ),
    BugSite(
        kind="swapped_arguments", module="words.py", function="vowel_ratio",
        fixed="return ratio(count_vowels(word), len(word))", buggy="return ratio(len(word), count_vowels(word))",
        entry_module="render.py", entry_function="describe_word", test_file="tests/test_render.py",
        tests=r'''
def test_describe_word_vowel_share():
    assert describe_word("banana") == "banana: 6 letters, 50% vowels"
    assert describe_word("rhythm") == "rhythm: 6 letters, 0% vowels"
''',
        title="describe_word() says 'banana' is 200% vowels",
        story="We use `describe_word()` in a spelling game for kids. The vowel percentage is over 100% for "
              "ordinary words.",
        snippet=r'''from __PKG__ import describe_word

print(describe_word("banana"))
''',
        expected="`banana: 6 letters, 50% vowels`",
        actual="`banana: 6 letters, 200% vowels`",
    ),
    BugSite(
        kind="wrong_return", module="chars.py", function="collapse_spaces",
        fixed="    cleaned = \" \".join(text.split())\n    return cleaned\n",
        buggy="    cleaned = \" \".join(text.split())\n    return text\n",
        entry_module="render.py", entry_function="stats_line", test_file="tests/test_render.py",
        tests=r'''
def test_stats_line_ignores_repeated_spaces():
    assert stats_line("hello   world") == "2 words, 5.0 letters per word"
    assert stats_line("  hello world ") == "2 words, 5.0 letters per word"
''',
        title="stats_line() counts extra words when the text has double spaces",
        story="Text pasted from our word processor often has runs of spaces, and the word count in the "
              "statistics line goes up with every extra space.",
        snippet=r'''from __PKG__ import stats_line

print(stats_line("hello   world"))
''',
        expected="`2 words, 5.0 letters per word`",
        actual="`4 words, 2.5 letters per word`",
    ),
    BugSite(
        kind="exception_handling", module="chars.py", function="to_int",
        fixed="    except ValueError:\n        raise ValueError(f\"{name}: expected an integer, got {text!r}\") from None\n",
        buggy="    except ValueError:\n        return 0\n",
        entry_module="render.py", entry_function="headline_for", test_file="tests/test_render.py",
        tests=r'''
def test_headline_for_rejects_a_bad_width():
    with pytest.raises(ValueError, match="width"):
        headline_for("hello world", {"width": "wide"})
''',
        title="headline_for() accepts a non-numeric width and produces garbage",
        story="We read the headline width from an INI file. Somebody wrote `width = wide`, and instead of "
              "an error we got mangled headlines on the live site.",
        snippet=r'''from __PKG__ import headline_for

print(headline_for("hello world", {"width": "wide"}))
''',
        expected="a `ValueError` that names the `width` setting",
        actual="no error; it prints `Hello Wo...`",
    ),
    BugSite(
        kind="string_formatting", module="chars.py", function="format_count",
        fixed="    return f\"{n:,} {noun}", buggy="    return f\"{n} {noun}",
        entry_module="render.py", entry_function="stats_line", test_file="tests/test_render.py",
        tests=r'''
def test_stats_line_groups_thousands():
    assert stats_line("word " * 1200) == "1,200 words, 4.0 letters per word"
''',
        title="Word counts over 999 are printed without a thousands separator",
        story="The statistics line of long articles shows '1200 words'; the style guide (and the "
              "docstring) want '1,200 words'.",
        snippet=r'''from __PKG__ import stats_line

print(stats_line("word " * 1200))
''',
        expected="`1,200 words, 4.0 letters per word`",
        actual="`1200 words, 4.0 letters per word`",
    ),
)

TEMPLATE = Template(
    name="textutils",
    packages=("textkit", "wordwise", "prosekit"),
    description="Text utilities: word counts, title case, headlines and reading statistics.",
    context="We use __PKG__ to prepare article text for our website.",
    modules={"chars.py": CHARS, "words.py": WORDS, "render.py": RENDER},
    exports={"render.py": ("describe_word", "headline", "headline_for", "stats_line"),
             "words.py": ("title_case", "word_count")},
    tests={"tests/test_chars.py": TEST_CHARS, "tests/test_words.py": TEST_WORDS, "tests/test_render.py": TEST_RENDER},
    sites=SITES,
)
