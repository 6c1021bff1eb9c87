"""The base class of mmadapters' own errors (the CLI reports any of them as one line, `error: ...`, exit 2), and the
"did you mean" hint of the messages that refuse an unknown name."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MMAdaptersError(Exception):
    """An error raised by mmadapters with a message that says what is wrong and what to do."""


def closest_names(unknown: Iterable[str], known: Iterable[str]) -> str:
    """A hint for misspelt names, `(did you mean 'training' for 'trainig'?)`, for the unknown names close to a known
    one; empty when none is."""
    hints = []
    for name in unknown:
        match = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.8)
        if match:
            hints.append(f"{match[0]!r} for {name!r}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""
