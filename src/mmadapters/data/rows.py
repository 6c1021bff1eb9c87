"""Taking the first rows of a data set, as every `limit` option does (recipes, loaders, evaluation)."""

from __future__ import annotations

from typing import Any


def first_rows(rows: Any, limit: int | None) -> Any:
    """The first `limit` rows of a `datasets.Dataset` (all of them when `limit` is None or more than there are)."""
    return rows if limit is None else rows.select(range(min(limit, len(rows))))


__all__ = ["first_rows"]
