"""Answer grader: extract a solution's final answer and decide whether it equals the reference.

Equality is decided in layers, from cheap and exact to expensive and tolerant:

1. canonical string forms (math delimiters, spacing, `\\dfrac`, degrees, units, `\\$`,
   thousands separators, `x =` / `x \\in` prefixes and `\\text{}` wrappers removed) compared;
2. multiple-choice letters compared as letters (`\\text{(C)}` == `C`);
3. rational literals (`-3`, `0.25`, `1,000`, `7/2`, `\\frac{3}{4}`, `1\\frac{4}{5}`) compared exactly;
   float tolerance only applies where a decimal meets a non-terminating fraction (`0.333333`
   vs `\\frac13`); numerals in a base (`52_8`, `2516_{9}`) by value and base, and bare digits
   against them as their digits (MATH's convention: `52` answers `52_8`, `42` does not);
4. tuples and intervals element by element, sets and comma lists as sets, using 1-3 per element;
5. math-verify, `verify(gold, pred)` with the gold first, on both sides parsed by its LaTeX
   parser (parses are cached: a gold is graded many times). Two checks run before it: constant
   expressions without floats are compared exactly (rationals) or to 50 significant digits,
   which rejects its false positive `1/2004!` == `1/2006!`; expressions in variables that take
   clearly different values at a sample point are unequal, which spares sympy's simplify().

math-verify's own timeouts use SIGALRM, so they only work in the main thread of a process. The
`Grader` therefore runs the checker in worker processes, each enforcing a per-item deadline with
its own interval timer, and the parent kills and replaces a worker that overruns it (a hang in C
code ignores signals) or dies. Such items get the status "timeout" or "checker_error", as does an
item whose check raises, never a silent "not equal".
"""

from __future__ import annotations

import gc
import json
import logging
import math
import multiprocessing
import multiprocessing.connection
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

from search.arguments import OneLineParser
from search.jsonl import JSONLError, iter_jsonl

GradeStatus = Literal["ok", "no_answer", "checker_error", "timeout"]
JUDGED_STATUSES: frozenset[str] = frozenset({"ok", "no_answer"})
"""Statuses whose `equal` is a verdict on the answer; the others say the check itself failed."""

DEFAULT_TIMEOUT_S = 5.0
MAX_CHECKED_CHARS = 8000
"""Longer pred + gold pairs are refused (status "checker_error"): no real answer is that long, and
with chunks bounded too, messages to a worker stay well below the socket buffer, so sending to a
hung worker never blocks the parent's watchdog."""

BARE_ANSWER_MAX_CHARS = 100
"""A marker-less text of one line up to this length is taken whole as the answer."""

_CHUNK_MAX_ITEMS = 32
_CHUNK_MAX_CHARS = 16_000
_STARTUP_TIMEOUT_S = 120.0
_READY = "ready"

# ---------------------------------------------------------------------------------------------
# Extraction


_BOX_COMMAND_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?\s*", re.IGNORECASE)
_GSM8K_RE = re.compile(r"####[ \t]*([^\n]*)")
_SENTENCE_END_RE = re.compile(r"\.(?:\s|$)")
_HOPE_SUFFIX_RE = re.compile(r"\.?\s*I hope it is correct.*$", re.IGNORECASE | re.DOTALL)
# "The answer is 6, since 2 + 4 = 6": the answer ends where a clause giving a reason begins.
_REASON_CLAUSE_RE = re.compile(r",?\s+(?:since|because|as|so|which|given|due)\b.*$", re.IGNORECASE)
_DELIMITERS = (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))


def _read_box_argument(text: str, start: int) -> tuple[str, int] | None:
    """The argument of a box command whose name ends at `start`, and the index just past it.

    `{...}` is read with balanced braces (escaped `\\{`, `\\}` skipped); `\\boxed 5` takes the next
    token. None when the braces never close (a truncated generation).
    """
    position = start
    while position < len(text) and text[position] == " ":
        position += 1
    if position < len(text) and text[position] == "{":
        depth = 0
        index = position
        while index < len(text):
            char = text[index]
            if char == "\\":
                index += 2
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[position + 1 : index].strip(), index + 1
            index += 1
        return None
    token = re.match(r"[^\s$]*", text[position:]).group(0)
    return token.rstrip(".,;"), position + len(token)


def _last_boxed(text: str) -> str | None:
    """Content of the last complete, non-empty `\\boxed{}` / `\\fbox{}` of `text`."""
    for match in reversed(list(_BOX_COMMAND_RE.finditer(text))):
        argument = _read_box_argument(text, match.end())
        if argument is not None and argument[0]:
            return argument[0]
    return None


def _strip_delimiters(answer: str) -> str:
    """Removes math delimiters (`$..$`, `\\(..\\)`, ...) and a `\\boxed{}` that wrap the whole answer."""
    text = answer.strip()
    while True:
        before = text
        for left, right in _DELIMITERS:
            inner = text[len(left) : -len(right)]
            if (
                len(text) >= len(left) + len(right)
                and text.startswith(left)
                and text.endswith(right)
                and left not in inner  # "$5$ and $6$" is two formulas, not one wrapped one
            ):
                text = inner.strip()
        box = _BOX_COMMAND_RE.match(text)
        if box is not None:
            argument = _read_box_argument(text, box.end())
            if argument is not None and argument[1] == len(text):
                text = argument[0]
        if text == before:
            return text


def _answer_after_phrase(text: str) -> str | None:
    """The answer stated after the last "answer is" (also "The final answer is $x$. I hope ...")."""
    matches = list(_ANSWER_IS_RE.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end() :]
    for left, right in _DELIMITERS:
        if rest.startswith(left):
            # The closing delimiter is the first one not escaped: "$\$36$" is 36 dollars.
            closing = re.compile(r"(?<!\\)" + re.escape(right)).search(rest, len(left))
            if closing:
                return rest[len(left) : closing.start()].strip() or None
    line = _HOPE_SUFFIX_RE.sub("", rest.split("\n", 1)[0])
    line = _SENTENCE_END_RE.split(line, 1)[0]
    line = _REASON_CLAUSE_RE.sub("", line).strip().strip("*").strip()
    return _strip_delimiters(line) or None


def extract_answer(text: str) -> str | None:
    """The final answer stated in a solution text, or None when it states none.

    In order: the content of the last complete `\\boxed{...}` / `\\fbox{...}` (balanced braces;
    a truncated last box is skipped), else what follows the last "answer is", else the last
    GSM8K `#### N`. A text with none of these markers that is a single line of at most
    `BARE_ANSWER_MAX_CHARS` characters (and no broken box) is a bare answer (`"42"`,
    `"$\\frac{1}{2}$"`) and is returned whole without its math delimiters, so
    `grade("0.5", "\\frac12")` works; a longer or multi-line text without a marker, or a
    sentence (`_is_prose`), is a solution that never stated an answer (None).
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    stated = _answer_after_phrase(text)
    if stated is not None:
        return stated
    gsm8k = _GSM8K_RE.findall(text)
    if gsm8k and gsm8k[-1].strip():
        return gsm8k[-1].strip()
    bare = text.strip()
    if (
        bare
        and "\n" not in bare
        and len(bare) <= BARE_ANSWER_MAX_CHARS
        and not _BOX_COMMAND_RE.search(bare)
        and not _is_prose(bare)
    ):
        return _strip_delimiters(bare) or None
    return None


_WORD_RE = re.compile(r"(?<![A-Za-z\\])[A-Za-z]{2,}(?![A-Za-z])")
_ADJACENT_WORDS_RE = re.compile(r"(?<![A-Za-z\\])[A-Za-z]{2,}[ \t]+[A-Za-z]{2,}(?![A-Za-z])")
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")


def _is_prose(text: str) -> bool:
    """Whether a marker-less line is a sentence rather than an answer: three or more words, two of them
    side by side, outside `\\text{}`-like wrappers ("10 square units" and "-(ab + ac + bc)" are answers;
    "Each child gets 5 apples, not 6." is not, and math-verify would grade its last number)."""
    plain = _LATEX_COMMAND_RE.sub(" ", _TEXT_WRAPPER_RE.sub(" ", text))
    return len(_WORD_RE.findall(plain)) >= 3 and _ADJACENT_WORDS_RE.search(plain) is not None


# ---------------------------------------------------------------------------------------------
# Canonical forms and exact comparison


_SPACING_RE = re.compile(
    r"\\[,;:! ]|~|\\q?quad(?![A-Za-z])|\\displaystyle(?![A-Za-z])|\\(?:left|right)(?![A-Za-z])"
)
_DEGREES_RE = re.compile(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![A-Za-z])|°|\\degree(?![A-Za-z])")
_FRACTION_COMMAND_RE = re.compile(r"\\[dt]frac(?![A-Za-z])")
# One-digit arguments braced: \sqrt3 -> \sqrt{3}, \frac12 -> \frac{1}{2}, \frac{\pi}2 -> \frac{\pi}{2}.
_SINGLE_DIGIT_ARGUMENT_RE = re.compile(r"\\(sqrt|frac)\s*(\d)")
_SINGLE_DIGIT_DENOMINATOR_RE = re.compile(r"(\\frac\{[^{}]*\})\s*(\d)")
_TRAILING_UNIT_RE = re.compile(
    r"(?<=\S)\s*\\(?:text|textrm|mbox|mathrm)\s*\{\s*(?P<words>[A-Za-z][A-Za-z .]*)\}(?:\^\{?\d\}?)?$"
)
# "36 dollars", "15 cm^2": words after a number are units (LaTeX commands were already removed).
_NUMBER_WITH_WORDS_RE = re.compile(
    r"(-?[\d.,/]*\d)\s+(?P<words>[A-Za-z]{2,}(?:\s+[A-Za-z]+)*)\.?(?:\^\{?\d\}?)?"
)
# Words that qualify or contradict a number rather than name its unit: "6 or more", "2 less than x",
# "5 is wrong" are not 6, 2 and 5.
_NOT_UNIT_WORDS = frozenset(
    "or and nor not no is are was were more less fewer greater smaller larger than at most least only "
    "about approximately roughly nearly almost over under above below plus minus times to from between "
    "if when with without wrong incorrect correct".split()
)


def _are_unit_words(words: str) -> bool:
    return not any(word.lower() in _NOT_UNIT_WORDS for word in words.replace(".", " ").split())


def _drop_trailing_unit(text: str) -> tuple[str, bool]:
    """`text` without a trailing `\\text{unit}`, and whether the words there qualify the number instead
    ("6 \\text{ or more}"), which math-verify would drop like a unit; then nothing is dropped."""
    match = _TRAILING_UNIT_RE.search(text)
    if match is None:
        return text, False
    return (text[: match.start()], False) if _are_unit_words(match["words"]) else (text, True)


def _drop_unit_words(text: str) -> tuple[str, bool]:
    """The same for plain words after a number: "36 dollars" is 36, "6 or more" stays as it is."""
    match = _NUMBER_WITH_WORDS_RE.fullmatch(text.strip())
    if match is None:
        return text, False
    return (match.group(1), False) if _are_unit_words(match["words"]) else (text, True)


_TEXT_WRAPPER_RE = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox)\s*\{([^{}]*)\}")
_CHOICE_RE = re.compile(r"\(([A-Ea-e])\)(?:\s.*)?|([A-E])")
_THOUSANDS_SEPARATOR_RE = re.compile(r"(?<=\d)(?:\{,\}|,\\!)\s*(?=\d)")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_ASSIGNMENT_RE = re.compile(r"([A-Za-z])(?:=|\\in)([^=<>]+)")
_WORDS_RE = re.compile(r"[A-Za-z][A-Za-z ]+")
_DECIMAL_RE = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
_BASE_NUMERAL_RE = re.compile(r"([0-9A-Za-z]*[0-9][0-9A-Za-z]*)_(?:\{(\d+)\}|(\d))")
_DIGITS_RE = re.compile(r"[0-9A-Za-z]+")
_SLASH_FRACTION_RE = re.compile(r"(-?)(\d+)/(\d+)")
_FRACTION_ARGUMENT = r"(?:\{(-?\d+)\}|(\d))"
_LATEX_FRACTION_RE = re.compile(rf"(-?)\\frac{_FRACTION_ARGUMENT}{_FRACTION_ARGUMENT}")
_MIXED_NUMBER_RE = re.compile(r"(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}")


_BARE_FUNCTION_RE = re.compile(
    r"(?<![\\A-Za-z])(exp|ln|log|sin|cos|tan|cot|sec|csc|arcsin|arccos|arctan|sinh|cosh|tanh|pi|theta)"
    r"(?![A-Za-z])"
)
_SCIENTIFIC_RE = re.compile(r"(?<![\w.\\])(\d+(?:\.\d+)?)[eE]([-+]?\d+)(?![\w.])")


def _plain_to_latex(text: str) -> str:
    """Translates plain-text notation (`2pi`, `exp(16)`, `x**2`, `1e-5`) to LaTeX.

    math-verify reads `exp(16)` as E*x*p(16) and `2pi` as 2*i*p. Words left after a number are
    handled by `_drop_unit_words`, afterwards.
    """
    text = text.replace("**", "^")
    text = _SCIENTIFIC_RE.sub(r"\1\\times10^{\2}", text)
    return _BARE_FUNCTION_RE.sub(r"\\\1", text)


@dataclass(frozen=True)
class _Canonical:
    """An answer reduced to what matters for the fast comparisons."""

    text: str
    variable: str | None  # x of "x = 5" or "x \in [1, 2]"
    number: Fraction | None  # value of a plain rational literal
    is_decimal: bool  # the literal was written with a decimal point
    choice: str | None  # multiple-choice letter
    brackets: str | None  # "()", "(]", ... of a tuple or interval; "{}" set; "" bare list
    items: tuple[_Canonical, ...] = ()  # elements of a tuple, interval, set or list
    qualified: bool = False  # a number followed by words that qualify it ("6 or more"), not a unit
    base_numeral: tuple[int, int] | None = None  # (value, base) of "52_8"; math-verify drops the base


def _parse_rational(text: str) -> tuple[Fraction, bool] | None:
    """The exact value of a plain rational literal and whether it was written as a decimal."""
    if _DECIMAL_RE.fullmatch(text):
        return Fraction(text), "." in text
    if match := _SLASH_FRACTION_RE.fullmatch(text):
        sign, numerator, denominator = match.groups()
        value = _safe_fraction(int(numerator), int(denominator))
        return None if value is None else (-value if sign else value, False)
    if match := _LATEX_FRACTION_RE.fullmatch(text):
        sign, numerator_braced, numerator_digit, denominator_braced, denominator_digit = match.groups()
        value = _safe_fraction(
            int(numerator_braced or numerator_digit), int(denominator_braced or denominator_digit)
        )
        return None if value is None else (-value if sign else value, False)
    if match := _MIXED_NUMBER_RE.fullmatch(text):
        sign, whole, numerator, denominator = match.groups()
        part = _safe_fraction(int(numerator), int(denominator))
        if part is None or part >= 1:  # "3\frac{5}{2}" reads as a product, not a mixed number
            return None
        value = int(whole) + part
        return -value if sign else value, False
    return None


def _safe_fraction(numerator: int, denominator: int) -> Fraction | None:
    return Fraction(numerator, denominator) if denominator else None


@lru_cache(maxsize=16384)
def _canonical(answer: str, top_level: bool = True) -> _Canonical:
    text = _strip_delimiters(answer)
    text = _THOUSANDS_SEPARATOR_RE.sub(",", text)  # before spacing: "10,\!080" is one number
    text = _SPACING_RE.sub(" ", text)
    text = _FRACTION_COMMAND_RE.sub(r"\\frac", text)
    text = _SINGLE_DIGIT_ARGUMENT_RE.sub(r"\\\1{\2}", text)
    text = _SINGLE_DIGIT_DENOMINATOR_RE.sub(r"\1{\2}", text)
    text = _DEGREES_RE.sub("", text)
    text = text.replace("\\$", "").replace("$", "")
    text = re.sub(r"(?<!\\)%", r"\\%", text).strip().rstrip(".,").strip()
    text, qualified_by_text = _drop_trailing_unit(text)
    text, qualified_by_words = _drop_unit_words(_plain_to_latex(text))
    qualified = qualified_by_text or qualified_by_words
    if match := _TEXT_WRAPPER_RE.fullmatch(text):
        text = match.group(1).strip()
    choice = None
    # Inside a tuple, C is a variable; "\text{(C) } 18" is choice C with its value.
    if top_level and (match := _CHOICE_RE.fullmatch(_TEXT_WRAPPER_RE.sub(r"\1", text).strip())):
        choice = (match.group(1) or match.group(2)).upper()
    if _THOUSANDS_RE.fullmatch(text):  # before spaces go: "58, 500" is a list, not 58500
        text = text.replace(",", "")
    text = re.sub(r"\s+", "", text) if not _WORDS_RE.fullmatch(text) else text.lower()
    variable = None
    if match := _ASSIGNMENT_RE.fullmatch(text):
        variable, text = match.groups()
    rational = _parse_rational(text)
    number, is_decimal = rational if rational is not None else (None, False)
    brackets, items = _split_sequence(text) if top_level else (None, ())
    return _Canonical(text, variable, number, is_decimal, choice, brackets, items, qualified, _base_numeral(text))


def _base_numeral(text: str) -> tuple[int, int] | None:
    """(value, base) of a numeral written in a base from 2 to 36; None for anything else (`x_1`)."""
    if not (match := _BASE_NUMERAL_RE.fullmatch(text)):
        return None
    digits, base = match.group(1), int(match.group(2) or match.group(3))
    try:
        return (int(digits, base), base) if 2 <= base <= 36 else None
    except ValueError:  # a digit the base does not have: a subscripted name, not a numeral
        return None


def _split_sequence(text: str) -> tuple[str | None, tuple[_Canonical, ...]]:
    """Brackets and canonical elements of `(a,b)`, `[a,b)`, `\\{a,b\\}` or `a,b` (no brackets: None)."""
    if len(text) < 3:
        return None, ()
    if text.startswith("\\{") and text.endswith("\\}"):
        brackets, inner = "{}", text[2:-2]
    elif text[:1] in "([" and text[-1:] in ")]" and _closing_index(text) == len(text) - 1:
        brackets, inner = text[0] + text[-1], text[1:-1]
    else:
        brackets, inner = "", text
    elements = _split_top_level_commas(inner)
    if len(elements) < 2 or not all(elements):
        return None, ()
    return brackets, tuple(_canonical(element, top_level=False) for element in elements)


def _closing_index(text: str) -> int:
    """Index of the bracket closing the one that opens `text` (any bracket kind closes any)."""
    depth = 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
            if depth == 0:
                return index
    return -1


def _split_top_level_commas(text: str) -> list[str]:
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return parts


def _terminates(value: Fraction) -> bool:
    """Whether the value has a finite decimal expansion (its denominator is 2^a * 5^b)."""
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    return denominator == 1


def _fast_verdict(pred: _Canonical, gold: _Canonical) -> bool | None:
    """Verdict from canonical forms alone; None when the symbolic checker must decide."""
    if gold.choice is not None:
        return pred.choice == gold.choice
    if pred.variable is not None and gold.variable is not None and pred.variable != gold.variable:
        return None  # "x = 5" vs "y = 5": math-verify's rules for equations apply
    if pred.text == gold.text:
        return True
    if pred.qualified or gold.qualified:
        return False  # "6 or more" is not 6, though math-verify drops the words
    if gold.base_numeral is not None:
        return _compare_base_numerals(pred, gold.base_numeral)
    exact = _compare_rationals(pred, gold)
    if exact is not None:
        return exact
    return _compare_sequences(pred, gold)


def _compare_sequences(pred: _Canonical, gold: _Canonical) -> bool | None:
    """Tuples and intervals compare element by element; sets and bare lists as multisets."""
    if pred.brackets is None or pred.brackets != gold.brackets:
        return None
    if gold.brackets in ("", "{}"):  # repeats don't count, as in math-verify's FiniteSet
        if all(item.number is not None and not item.is_decimal for item in pred.items + gold.items):
            return {item.number for item in pred.items} == {item.number for item in gold.items}
        return True if {item.text for item in pred.items} == {item.text for item in gold.items} else None
    if len(pred.items) != len(gold.items):
        return False
    verdicts = [_fast_verdict(p, g) for p, g in zip(pred.items, gold.items)]
    if False in verdicts:
        return False
    return True if all(verdicts) else None


def _compare_base_numerals(pred: _Canonical, gold: tuple[int, int]) -> bool | None:
    """A numeral in the same base and of the same value, or the gold's digits written bare."""
    if pred.base_numeral is not None:
        return pred.base_numeral == gold
    if not _DIGITS_RE.fullmatch(pred.text):
        return None
    try:
        return int(pred.text, gold[1]) == gold[0]
    except ValueError:  # digits the gold's base does not have
        return False


def _compare_rationals(pred: _Canonical, gold: _Canonical) -> bool | None:
    """Exact verdict on two rational literals; None when tolerance must decide (0.333 vs 1/3)."""
    if pred.number is None or gold.number is None:
        return None
    if pred.number == gold.number:
        return True
    if not (pred.is_decimal or gold.is_decimal):
        return False
    if _terminates(pred.number) and _terminates(gold.number):
        return False
    return None


# ---------------------------------------------------------------------------------------------
# math-verify


_EXACT_DIGITS = 50
_SAMPLE_OFFSETS = (0.5772156649, 1.3247179572, 2.7182818284)  # irrational-looking, not special
_MAX_EXACT_BITS = 1e6  # exact integers up to ~300,000 digits
_MAX_FLOAT_BITS = 1e15  # mpmath floats carry binary exponents far beyond this


def _latex_for_checker(answer: str) -> str:
    """The answer as math-verify reads it best: boxed LaTeX."""
    return "\\boxed{" + _drop_unit_words(_plain_to_latex(_strip_delimiters(answer)))[0] + "}"


@lru_cache(maxsize=8192)
def _parse_cached(latex: str) -> tuple[Any, ...]:
    from math_verify import parse

    return tuple(parse(latex, parsing_timeout=None, raise_on_error=True))


def _plain_expression(value: Any) -> bool:
    """An expression math-verify compares by value: no relation, set, matrix, float, percentage,
    and not a bare symbol or product of symbols (those it compares as text: `ab` == `\\text{ab}`)."""
    from sympy import E, Expr, Float, Mul, Symbol, UnevaluatedExpr
    from sympy.matrices import MatrixBase
    from sympy.matrices.expressions import MatrixExpr

    return (
        isinstance(value, Expr)
        and not isinstance(value, (MatrixBase, MatrixExpr, Symbol))
        and not (isinstance(value, Mul) and all(arg.is_Symbol or arg == E for arg in value.args))
        and not value.has(Float)
        and not value.has(UnevaluatedExpr)  # percentages: math-verify's "9% == 9" leniency applies
    )


def _log2_magnitude(value: Any) -> int:
    """About log2 |value| for a constant of any size (Python floats overflow at 2^1024)."""
    import mpmath

    approximation = value.evalf(15)
    if approximation == 0:
        return 0
    return int(mpmath.frexp(approximation._to_mpmath(53))[1])


def _evaluation_bits(expression: Any) -> float:
    """Rough size in bits of the largest number that evaluating `expression` exactly builds."""
    from sympy import Pow, factorial, preorder_traversal

    largest = 0.0
    for node in preorder_traversal(expression):
        try:
            if isinstance(node, Pow) and node.base.is_number and node.exp.is_number:
                bits = abs(float(node.exp.evalf(15))) * max(1, _log2_magnitude(node.base))
            elif isinstance(node, factorial) and node.args[0].is_number:
                argument = abs(float(node.args[0].evalf(15)))
                bits = argument * math.log2(max(argument, 2.0))
            else:
                continue
        except (TypeError, ValueError, OverflowError, AttributeError):
            return math.inf
        if math.isnan(bits):
            return math.inf
        largest = max(largest, bits)
    return largest


def _compare_constants(gold: Any, pred: Any) -> bool | None:
    """Verdict on two float-free constant expressions; None when not both are such.

    math-verify compares constants by evaluating their difference to 15 digits with tiny values
    chopped to zero, so any two tiny constants "match" (`1/2004!` and `1/2006!`). Here rationals
    are compared exactly, other constants (`\\sqrt{3}/3`, `e^{16}`) to 50 significant digits.
    Constants too big to evaluate exactly (`1/100000!`) can only be found different here.
    """
    from sympy import Float

    if not all(_plain_expression(value) and value.is_number for value in (gold, pred)):
        return None
    bits = max(_evaluation_bits(gold), _evaluation_bits(pred))
    exact = bits <= _MAX_EXACT_BITS
    if exact:
        gold, pred = gold.doit(), pred.doit()
        if gold.is_Rational and pred.is_Rational:
            return bool(gold == pred)
    elif not bits <= _MAX_FLOAT_BITS:
        return None  # 9^(9^(9^9)): nothing can evaluate it; math-verify gets its chance
    gold_float, pred_float = gold.evalf(_EXACT_DIGITS), pred.evalf(_EXACT_DIGITS)
    if not (gold_float.is_Number and pred_float.is_Number and gold_float.is_finite and pred_float.is_finite):
        return None
    scale = max(abs(gold_float), abs(pred_float))
    if abs(gold_float - pred_float) > scale * Float(10) ** (5 - _EXACT_DIGITS):
        return False
    return True if exact else None


def _differ_at_sample_points(gold: Any, pred: Any) -> bool:
    """Whether two expressions take clearly different values at some point.

    math-verify compares variables strictly (`2x` is not `2y`), so equal expressions agree at
    every point where both are defined and a clear difference at a sample point proves them
    different; points where either side is undefined are skipped.
    """
    if not (_plain_expression(gold) and _plain_expression(pred)):
        return False
    symbols = sorted(gold.free_symbols | pred.free_symbols, key=str)
    if not symbols:
        return False  # constants are _compare_constants' job
    if not max(_evaluation_bits(gold), _evaluation_bits(pred)) <= _MAX_FLOAT_BITS:
        return False
    for offset in _SAMPLE_OFFSETS:
        point = {symbol: offset + 0.1 * index for index, symbol in enumerate(symbols)}
        try:
            gold_value = complex(gold.evalf(30, subs=point))
            pred_value = complex(pred.evalf(30, subs=point))
        except (TypeError, ValueError, ZeroDivisionError, OverflowError):
            continue
        parts = (gold_value.real, gold_value.imag, pred_value.real, pred_value.imag)
        if not all(math.isfinite(part) for part in parts):
            continue
        if abs(gold_value - pred_value) > 1e-9 * max(1.0, abs(gold_value), abs(pred_value)):
            return True
    return False


def _checker_equal(pred_answer: str, gold: str) -> bool:
    from math_verify import verify

    gold_parsed = list(_parse_cached(_latex_for_checker(gold)))
    pred_parsed = list(_parse_cached(_latex_for_checker(pred_answer)))
    if not gold_parsed or not pred_parsed:
        return False
    constants = _compare_constants(gold_parsed[0], pred_parsed[0])
    if constants is not None:
        return constants
    if _differ_at_sample_points(gold_parsed[0], pred_parsed[0]):
        return False  # spares sympy's simplify(), the slowest part of a "not equal"
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None, raise_on_error=True))


def answers_equal(pred_answer: str, gold: str) -> bool:
    """Whether an extracted answer equals the reference answer (see the module docstring).

    Runs in the calling process with no timeout (math-verify's timeouts are disabled so this
    works in any thread): bound it from outside, as `Grader` does. Exceptions of the checker
    propagate; callers report them rather than reading them as "not equal".
    """
    pred = _canonical(pred_answer)
    if not pred.text and pred.choice is None:
        return False
    verdict = _fast_verdict(pred, _canonical(gold))
    return verdict if verdict is not None else _checker_equal(pred_answer, gold)


def is_single_value(answer: str) -> bool:
    """Whether an answer is one value (a number, an expression or words), not a multiple-choice letter
    nor a tuple, interval, set or list."""
    canonical = _canonical(answer)
    return canonical.choice is None and canonical.brackets is None


@dataclass(frozen=True)
class PlainNumber:
    """An answer that is one plain rational number, as written."""

    places: int | None  # decimal places (0 for an integer); None for a fraction


def plain_number(answer: str) -> PlainNumber | None:
    """The answer as one plain number (an integer, a decimal or a fraction; a unit, `$` or `x =` aside),
    or None for words, expressions, infinity, a choice letter, several values or a qualified number:
    what a program's printed result can be held to."""
    canonical = _canonical(answer)
    if canonical.number is None or canonical.choice is not None or canonical.brackets is not None or canonical.qualified:
        return None
    places = len(canonical.text.partition(".")[2]) if _DECIMAL_RE.fullmatch(canonical.text) else None
    return PlainNumber(places)


# ---------------------------------------------------------------------------------------------
# Worker processes


class _ItemDeadline(BaseException):
    """Raised by the worker's timer; a BaseException so sympy's `except Exception` can't eat it."""


def _on_item_deadline(signum: int, frame: Any) -> None:
    raise _ItemDeadline


def _check_one(pred_answer: str, gold: str, timeout_s: float) -> tuple[bool, GradeStatus]:
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        return answers_equal(pred_answer, gold), "ok"
    except _ItemDeadline:
        return False, "timeout"
    except Exception:  # noqa: BLE001 - any checker failure is reported as such, never as "wrong"
        return False, "checker_error"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _worker_main(conn: Connection, timeout_s: float, memory_mb: int | None) -> None:
    """Worker loop: receive chunks of (index, pred_answer, gold), answer one result per item."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if memory_mb is not None:
        import resource

        limit = memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # "timeout disabled" warnings
    answers_equal("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")  # import and compile everything now
    gc.freeze()  # sympy's and the parser's import-time objects: spared by every later collection (~10%)
    signal.signal(signal.SIGALRM, _on_item_deadline)
    conn.send(_READY)
    while True:
        try:
            chunk = conn.recv()
        except EOFError:  # the parent is gone
            return
        if chunk is None:
            return
        for index, pred_answer, gold in chunk:
            try:
                equal, status = _check_one(pred_answer, gold, timeout_s)
            except _ItemDeadline:  # the timer fired while it was being cancelled
                equal, status = False, "timeout"
            conn.send((index, equal, status))


def _worker_entry(argv: list[str]) -> None:
    """Entry point of a worker interpreter: `FD TIMEOUT_S MEMORY_MB` (0 = no memory limit)."""
    fd, timeout_s, memory_mb = int(argv[0]), float(argv[1]), int(argv[2])
    _worker_main(Connection(fd), timeout_s, memory_mb or None)


# Workers are fresh interpreters rather than multiprocessing children: "spawn" re-runs the
# caller's main script (a guard-less script would recurse) and "fork" clones whatever threads
# the caller holds (Prefect, torch).
_WORKER_BOOT = (
    "import sys; sys.path.insert(0, sys.argv[1]); "
    "import search.grading as grading; grading._worker_entry(sys.argv[2:])"
)
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class _WorkerHandle:
    process: subprocess.Popen[bytes]
    conn: Connection
    in_flight: deque[int] = field(default_factory=deque)
    head_since: float = 0.0


def _spawn_worker(timeout_s: float, memory_mb: int | None) -> _WorkerHandle:
    parent_end, child_end = multiprocessing.Pipe(duplex=True)
    arguments = [_PACKAGE_ROOT, str(child_end.fileno()), repr(timeout_s), str(memory_mb or 0)]
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", _WORKER_BOOT, *arguments],
            pass_fds=(child_end.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # never mixed into the caller's output (the CLI prints JSON)
        )
    except BaseException:
        parent_end.close()
        raise
    finally:
        child_end.close()  # so the parent sees EOF when the worker dies
    return _WorkerHandle(process, parent_end)


def _kill_worker(worker: _WorkerHandle) -> None:
    worker.process.kill()
    worker.process.wait()
    worker.conn.close()


def _stop_worker(worker: _WorkerHandle) -> None:
    try:
        worker.conn.send(None)
        worker.process.wait(timeout=2.0)
    except (OSError, subprocess.TimeoutExpired):
        pass
    _kill_worker(worker)


def _stop_workers(workers: list[_WorkerHandle]) -> None:
    for worker in workers:
        _stop_worker(worker)
    workers.clear()


# ---------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one prediction. `equal` is only True with status "ok"."""

    equal: bool
    pred_answer: str | None
    status: GradeStatus

    def to_json(self) -> dict[str, Any]:
        return {"equal": self.equal, "pred_answer": self.pred_answer, "status": self.status}


@dataclass
class _Batch:
    """One `grade_many` call in progress: answers still to check and verdicts so far."""

    answers: list[str | None]
    golds: list[str]
    results: list[GradeResult | None]
    pending: deque[int]

    def take_chunk(self, max_items: int) -> list[int]:
        chunk, chars = [], 0
        while self.pending and len(chunk) < max_items and chars < _CHUNK_MAX_CHARS:
            index = self.pending.popleft()
            chunk.append(index)
            chars += len(self.answers[index] or "") + len(self.golds[index])
        return chunk

    def give_back(self, indices: Sequence[int]) -> None:
        """Puts unchecked items back at the front, in order."""
        self.pending.extendleft(reversed(indices))

    def record(self, index: int, equal: bool, status: GradeStatus) -> None:
        self.results[index] = GradeResult(equal, self.answers[index], status)


class Grader:
    """Grades predictions against references in worker processes; use as a context manager.

    Each item gets at most `timeout_s` seconds of checking (enforced inside the worker by a
    timer); a worker that overruns that by a grace period (stuck in C code) is killed and
    replaced, and its item reported "timeout"; a worker that dies takes only its current item
    with it ("checker_error"). Workers run under an address-space limit of `memory_mb` (None:
    no limit), so a runaway checker fails with MemoryError ("checker_error") instead of
    swapping the machine. Thread-safe: calls are serialised.
    """

    def __init__(self, workers: int = 2, timeout_s: float = DEFAULT_TIMEOUT_S, memory_mb: int | None = 2048):
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        # A hung worker is killed this long after its item started; the timer inside the
        # worker normally answers well before.
        self.kill_after_s = timeout_s + 1.0 + 0.5 * timeout_s
        self._lock = threading.Lock()
        self._closed = False
        self._pool: list[_WorkerHandle] = []
        self._finalizer = weakref.finalize(self, _stop_workers, self._pool)
        self._fill_pool()

    # -- lifecycle -------------------------------------------------------------------------

    def _fill_pool(self) -> None:
        """Starts workers (in parallel) until the pool is full again."""
        missing = self.workers - len(self._pool)
        starting = [_spawn_worker(self.timeout_s, self.memory_mb) for _ in range(missing)]
        try:
            for worker in starting:
                self._await_ready(worker)
        except BaseException:
            for worker in starting:
                _kill_worker(worker)
            raise
        self._pool.extend(starting)

    def _await_ready(self, worker: _WorkerHandle) -> None:
        if not worker.conn.poll(_STARTUP_TIMEOUT_S):
            _kill_worker(worker)
            raise RuntimeError(f"grader worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
        try:
            if worker.conn.recv() == _READY:
                return
        except (EOFError, OSError):  # it is exiting: let it, for a meaningful exit code
            try:
                worker.process.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                pass
        _kill_worker(worker)
        raise RuntimeError(
            f"grader worker failed to start (exit code {worker.process.returncode}; its error is on stderr)"
        )

    def _replace(self, worker: _WorkerHandle) -> None:
        _kill_worker(worker)
        self._pool.remove(worker)
        self._fill_pool()

    def close(self) -> None:
        """Stops the worker processes; idempotent."""
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the current workers (for monitoring; they change when one is replaced)."""
        return [worker.process.pid for worker in self._pool]

    # -- grading ---------------------------------------------------------------------------

    def grade(self, pred: str, gold: str) -> GradeResult:
        """Grades one prediction (a whole solution or a bare answer) against a reference answer."""
        return self.grade_many([(pred, gold)])[0]

    def grade_many(self, items: Sequence[tuple[str, str]]) -> list[GradeResult]:
        """Grades (pred, gold) pairs in parallel; results come back in input order."""
        answers = [extract_answer(pred) for pred, _ in items]
        batch = _Batch(answers, [gold for _, gold in items], [None] * len(items), deque())
        for index, answer in enumerate(batch.answers):
            if answer is None:
                batch.record(index, False, "no_answer")
            elif len(answer) + len(batch.golds[index]) > MAX_CHECKED_CHARS:
                batch.record(index, False, "checker_error")
            else:
                batch.pending.append(index)
        if batch.pending:
            with self._lock:
                if self._closed:
                    raise RuntimeError("Grader is closed")
                self._run(batch)
        return batch.results  # type: ignore[return-value]  # every slot is filled by now

    def _run(self, batch: _Batch) -> None:
        self._fill_pool()  # after an interrupted call
        chunk_size = max(1, min(_CHUNK_MAX_ITEMS, math.ceil(len(batch.pending) / (4 * self.workers))))
        try:
            while batch.pending or any(worker.in_flight for worker in self._pool):
                for worker in list(self._pool):
                    # At most one unread chunk queued behind the one being checked.
                    if batch.pending and len(worker.in_flight) <= chunk_size:
                        self._send_chunk(worker, batch, chunk_size)
                self._wait_and_collect(batch)
        except BaseException:
            # Their items in flight would be answered into the next call: drop those workers.
            for worker in [worker for worker in self._pool if worker.in_flight]:
                _kill_worker(worker)
                self._pool.remove(worker)
            raise

    def _send_chunk(self, worker: _WorkerHandle, batch: _Batch, chunk_size: int) -> None:
        chunk = batch.take_chunk(chunk_size)
        try:
            worker.conn.send([(index, batch.answers[index], batch.golds[index]) for index in chunk])
        except OSError:  # it died since its last answer: nothing of this chunk was started
            batch.give_back(chunk)
            self._collect(worker, batch)  # answers it wrote before dying still count
            if worker in self._pool:
                if worker.in_flight:
                    self._fail_head(worker, batch, "checker_error")
                else:
                    self._replace(worker)
            return
        if not worker.in_flight:
            worker.head_since = time.monotonic()
        worker.in_flight.extend(chunk)

    def _wait_and_collect(self, batch: _Batch) -> None:
        """Takes whatever answers arrive before the earliest kill deadline; kills the overdue."""
        busy = [worker for worker in self._pool if worker.in_flight]
        if not busy:
            return
        next_kill = min(worker.head_since for worker in busy) + self.kill_after_s
        ready = multiprocessing.connection.wait(
            [worker.conn for worker in busy], timeout=max(0.0, next_kill - time.monotonic())
        )
        for worker in busy:
            if worker.conn in ready:
                self._collect(worker, batch)
        now = time.monotonic()
        for worker in busy:
            overdue = worker.in_flight and now - worker.head_since > self.kill_after_s
            if overdue and worker in self._pool and not worker.conn.poll():
                self._fail_head(worker, batch, "timeout")

    def _collect(self, worker: _WorkerHandle, batch: _Batch) -> None:
        try:
            while worker.in_flight and worker.conn.poll():
                index, equal, status = worker.conn.recv()
                worker.in_flight.popleft()
                batch.record(index, equal, status)
                worker.head_since = time.monotonic()
        except (EOFError, OSError):
            self._fail_head(worker, batch, "checker_error")

    def _fail_head(self, worker: _WorkerHandle, batch: _Batch, status: GradeStatus) -> None:
        """The worker died or hung on its current item: report that item, retry the rest elsewhere."""
        batch.record(worker.in_flight.popleft(), False, status)
        batch.give_back(worker.in_flight)
        self._replace(worker)


# ---------------------------------------------------------------------------------------------
# CLI


class _InputError(Exception):
    """A problem with the user's input file, reported as one error line."""


def _read_pairs(path: str) -> Iterator[tuple[str, str]]:
    """(pred, gold) pairs from a JSONL file (`-` is stdin); blank lines are skipped."""
    try:
        stream = sys.stdin.buffer if path == "-" else Path(path).open("rb")
    except OSError as error:
        raise _InputError(f"cannot read {path}: {error.strerror}") from None
    with stream:
        try:
            records = list(iter_jsonl(stream, path))
        except JSONLError as error:
            raise _InputError(str(error)) from None
        for where, record in records:
            if not isinstance(record, dict):
                raise _InputError(f'{where}: expected an object {{"pred": ..., "gold": ...}}')
            yield _field(record, "pred", where), _field(record, "gold", where)


def _field(record: dict[str, Any], key: str, where: str) -> str:
    value = record.get(key)
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):  # JSON numbers: "gold": 18
        return str(value)
    raise _InputError(f"{where}: field {key!r} must be a string (got {type(value).__name__})")


def cli_grade(argv: list[str]) -> int:
    """`kaizen grade PRED GOLD` or `kaizen grade --jsonl FILE`: one JSON verdict per pair."""
    parser = OneLineParser(
        prog="kaizen grade",
        description=(
            "Grade predictions against reference answers. Prints one JSON object per pair, in "
            'input order: {"equal", "pred_answer", "status"} with status ok, no_answer, '
            "checker_error or timeout. PRED may be a whole solution (its last \\boxed{} is graded) "
            "or a bare answer; put `--` before a PRED that starts with '-'. Exit 0 whatever the "
            "verdicts; 2 for usage errors, 1 for unreadable or malformed input."
        ),
    )
    parser.add_argument("pred", nargs="?", help="predicted solution or answer")
    parser.add_argument("gold", nargs="?", help="reference answer")
    parser.add_argument("--jsonl", metavar="FILE", help='JSON lines {"pred": ..., "gold": ...}; - for stdin')
    parser.add_argument("--workers", type=int, default=2, help="checker processes (default 2)")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds of checking per pair (default 5)"
    )
    try:
        args = parser.parse_args(argv)
        if args.jsonl is not None and args.pred is not None:
            parser.error("give either PRED GOLD or --jsonl FILE, not both")
        if args.jsonl is None and args.gold is None:
            parser.error("give PRED GOLD or --jsonl FILE")
        if args.workers < 1:
            parser.error(f"--workers must be at least 1, got {args.workers}")
        if not args.timeout > 0:
            parser.error(f"--timeout must be positive, got {args.timeout}")
    except SystemExit as stop:  # usage error (already reported) or --help
        return int(stop.code or 0)

    try:
        # The whole file is checked before any verdict is printed: bad input never leaves a
        # partial output that looks complete.
        pairs = [(args.pred, args.gold)] if args.jsonl is None else list(_read_pairs(args.jsonl))
    except _InputError as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 1
    if not pairs:
        return 0
    with Grader(workers=min(args.workers, len(pairs)), timeout_s=args.timeout) as grader:
        for start in range(0, len(pairs), 4096):
            for result in grader.grade_many(pairs[start : start + 4096]):
                sys.stdout.write(json.dumps(result.to_json(), ensure_ascii=False) + "\n")
            sys.stdout.flush()
    return 0
