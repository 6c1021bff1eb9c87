"""Saved configs name the backbones as recorded (portable names, Hub ids), never by machine paths."""

from __future__ import annotations

from typing import Any


def with_recorded_backbone_names(values: dict[str, Any]) -> dict[str, Any]:
    """Set each backbone sub-config's `_name_or_path` to the name recorded for that backbone (or drop it when the
    backbone was built from a config object), in a composite config's dict."""
    for role in ("text", "vision"):
        sub_config = values.get(f"{role}_config")
        if not isinstance(sub_config, dict) or "_name_or_path" not in sub_config:
            continue
        recorded = values.get(f"{role}_backbone") or {}
        sub_config["_name_or_path"] = recorded.get("name_or_path", "")
    return values
