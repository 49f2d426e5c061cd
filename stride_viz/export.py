"""Files users open elsewhere: CSV cells a spreadsheet shows as text, never runs.

A spreadsheet treats a cell that starts with ``=``, ``+``, ``-`` or ``@`` (and, in some, a tab
or a carriage return) as a formula; text from a pool or a prompt must never become one. Every
CSV this project writes (Explore's and Select's downloads, the audit's ``flagged.csv``) goes
through :func:`safe_cell` or :func:`csv_text`.
"""
from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["safe_cell", "csv_text", "SPREADSHEET_STARTS"]

SPREADSHEET_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """``value`` as a CSV cell: a string starting with one of :data:`SPREADSHEET_STARTS` gets a
    leading single quote; numbers and other values are left as they are."""
    return "'" + value if isinstance(value, str) and value.startswith(SPREADSHEET_STARTS) else value


def csv_text(table: pd.DataFrame) -> str:
    """The table as CSV with every text cell passed through :func:`safe_cell`."""
    safe = table.copy()
    for col in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[col]):
            safe[col] = safe[col].map(safe_cell)
    return safe.to_csv(index=False)
