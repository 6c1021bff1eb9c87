"""Command-line flags generated from a settings dataclass: one `--field-name` per field, with the field's default,
help text and argparse options from its metadata (booleans get `--x` / `--no-x`). The dataclass stays the one
place where a setting, its default and its documentation live."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any


def add_dataclass_arguments(parser: argparse.ArgumentParser, settings_class: type) -> None:
    """Add a flag per field of `settings_class` (fields need a `help` in their metadata)."""
    for field in dataclasses.fields(settings_class):
        options = dict(field.metadata)
        help_text = options.pop("help")
        flag = "--" + field.name.replace("_", "-")
        # A default that depends on the machine (QuickstartSettings.bf16) comes from a factory.
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        if isinstance(default, bool):
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=f"{help_text} (default: %(default)s)",
            )
        else:
            parser.add_argument(flag, default=default, help=f"{help_text} (default: %(default)s)", **options)


def dataclass_from_arguments(settings_class: type, args: argparse.Namespace) -> Any:
    """The settings the parsed flags describe."""
    return settings_class(
        **{field.name: getattr(args, field.name) for field in dataclasses.fields(settings_class)}
    )


__all__ = ["add_dataclass_arguments", "dataclass_from_arguments"]
