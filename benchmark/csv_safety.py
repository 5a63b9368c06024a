"""Text cells of the CSVs the project writes cannot start a spreadsheet formula (CSV injection).

A cell whose text starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return is run as a
formula by spreadsheet programs (``=HYPERLINK(...)``, ``+cmd|' /C calc'!A0``, ``@SUM(1+1)``).
Submissions whose ``--name`` or ``--notes`` start so are refused (``benchmark.submit``); as a
second line of defence every text cell is neutralised when a board is written, as OWASP
recommends: a single quote is put in front (the spreadsheet shows the text, runs nothing).
Numbers are left alone, also when written as text (``-0.5`` stays ``-0.5``).
"""

from __future__ import annotations

import re

import pandas as pd

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_PLAIN_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


def starts_formula(text: str) -> bool:
    """Whether a spreadsheet would read ``text`` as a formula (a plain number is not one).

    >>> [starts_formula(s) for s in ("=1+1", "@SUM(A1)", "-0.5", "lenet", "", "\\tx")]
    [True, True, False, False, False, True]
    """
    return isinstance(text, str) and text.startswith(FORMULA_PREFIXES) and not _PLAIN_NUMBER.fullmatch(text)


def neutralise(value):
    """``value`` with a single quote in front when it is text that would start a formula; else as is.

    >>> neutralise("=HYPERLINK(1)"), neutralise("-3"), neutralise(2.5), neutralise("ok")
    ("'=HYPERLINK(1)", '-3', 2.5, 'ok')
    """
    return "'" + value if starts_formula(value) else value


def safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with every formula-starting text cell neutralised (text columns only; other cells and
    the column dtypes unchanged). Returns ``df`` itself when nothing needs it."""
    out = None
    for col in df.columns:
        s = df[col]
        if not (pd.api.types.is_object_dtype(s.dtype) or pd.api.types.is_string_dtype(s.dtype)):
            continue
        bad = [starts_formula(v) for v in s]
        if any(bad):
            out = df.copy() if out is None else out
            out[col] = pd.Series([neutralise(v) if b else v for v, b in zip(s, bad)], index=s.index, dtype=s.dtype)
    return df if out is None else out
