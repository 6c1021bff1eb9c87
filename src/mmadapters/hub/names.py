"""Telling Hub repo ids from local paths, for commands that accept either."""

from __future__ import annotations

import os


def is_hub_id(name: str | None) -> bool:
    """A Hub repo id (`owner/name`), as opposed to a local path."""
    if not name or os.path.isabs(name) or name.startswith((".", "~")) or os.path.exists(name):
        return False
    return name.count("/") == 1


def looks_like_local_path(name: str) -> bool:
    """A name that can only be a local path (a Hub id is `name` or `namespace/name`)."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or os.sep in name.replace("/", "")
    )


def check_checkpoint_name(name: str) -> None:
    """Fail early, before any backbone loads, when `name` is a local path that does not exist. Hub ids
    (`owner/name`) and bare names pass: the Hub client reports those."""
    looks_like_path = os.sep in name or name.startswith((".", "~"))
    if looks_like_path and not os.path.isdir(name) and not is_hub_id(name):
        raise FileNotFoundError(f"checkpoint folder {name} does not exist")
