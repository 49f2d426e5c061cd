"""The two records every layer shares: a query to explain and a planted fact.

They live apart from :mod:`stride_viz.data.pools` so that :mod:`stride_viz.data.facts` (which
builds facts) and the pools module (which loads them) both import them without importing each
other.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["Query", "Fact"]


@dataclass(frozen=True)
class Query:
    """A prompt and the completion whose likelihood is explained (``None``: the model's own
    greedy continuation is generated first)."""

    id: str
    prompt: str
    completion: Optional[str] = None

    @property
    def text(self) -> str:
        return self.prompt + (self.completion or "")


@dataclass(frozen=True)
class Fact:
    """A planted fact: the query that asks for it and the ids of the pool documents stating it."""

    query: Query
    source_ids: tuple[str, ...]
