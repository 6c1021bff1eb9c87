"""Type checks for settings read from files (recipes, adapter_config.json): a wrong type is named with its field,
before any model loads, instead of surfacing as a comparison error deep inside the code that uses it."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

# Simple annotations we check, and what they accept (an int is a valid float; a bool is not a valid int).
_ACCEPTS: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


_DESCRIBED = {(int,): "an integer", (int, float): "a number", (bool,): "true or false", (str,): "a string"}


def _annotation_name(annotation: Any) -> str:
    return annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))


def _accepted(annotation: Any) -> tuple[tuple[type, ...], bool] | None:
    """(accepted types, None allowed) for a simple annotation such as `int`, `float | None`; None otherwise."""
    parts = [
        part.strip() for part in _annotation_name(annotation).replace("Optional[", "").rstrip("]").split("|")
    ]
    optional = "None" in parts
    parts = [part for part in parts if part != "None"]
    if len(parts) != 1 or parts[0] not in _ACCEPTS:
        return None
    return _ACCEPTS[parts[0]], optional


def type_errors(fields_of: type, values: dict[str, Any]) -> dict[str, str]:
    """{field: "must be ..., got ..."} for the `values` whose type does not match the simple annotations of
    dataclass `fields_of` (the caller names the owner)."""
    errors = {}
    annotations = {field.name: field.type for field in dataclasses.fields(fields_of)}
    for name, value in values.items():
        accepted = _accepted(annotations[name]) if name in annotations else None
        if accepted is None:
            continue
        types, optional = accepted
        if value is None and optional:
            continue
        if isinstance(value, bool) and bool not in types:
            ok = False
        else:
            ok = isinstance(value, types)
        if not ok:
            expected = _DESCRIBED[types] + (" or null" if optional else "")
            errors[name] = f"must be {expected}, got {value!r} ({type(value).__name__})"
    return errors


def yaml_number(text: str) -> str | None:
    """How to write `text` (a number in exponent notation, `1e-4`, `1.5e4`) so that YAML reads a number
    (`1.0e-4`, `1.5e+4`): PyYAML follows YAML 1.1, where the mantissa's dot and the exponent's sign are required.
    None for any other text."""
    mantissa, marker, exponent = text.strip().lower().partition("e")
    try:
        float(text)
    except ValueError:
        return None
    if not marker:
        return None
    dot = "" if "." in mantissa else ".0"
    sign = "" if exponent.startswith(("+", "-")) else "+"
    written = f"{mantissa}{dot}e{sign}{exponent}"
    return None if written == text.strip().lower() else written


def check_positive_int(value: Any, name: str, optional: bool = False) -> Any:
    """`value` if it is an integer >= 1 (or None, where `optional`); else a ValueError naming `name`: a setting read
    from a file (processor_config.json) is checked where it is read, not met later as a comparison error."""
    if value is None and optional:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        allowed = "a positive integer or None" if optional else "a positive integer"
        raise ValueError(f"{name} must be {allowed}, got {value!r}.")
    return value


def check_bool(value: Any, name: str) -> bool:
    """`value` if it is True or False; else a ValueError naming `name` (a string such as "no" is truthy)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


# argparse types for the command-line numbers (a count of steps, questions, tokens, retries, a port).


def _number(text: str, convert: type, allowed: Any, wanted: str) -> Any:
    """`text` converted, or argparse's error saying what was `wanted`."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {text!r}") from None
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"expected {wanted}, got {value}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of steps, questions, tokens...)."""
    return _number(text, int, lambda value: value >= 1, "a positive integer")


def limit_or_all(text: str) -> int | None:
    """argparse type: a positive integer, or "all" (None: no limit)."""
    if text.strip().lower() == "all":
        return None
    return _number(text, int, lambda value: value >= 1, 'a positive integer or "all"')


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0 (retries)."""
    return _number(text, int, lambda value: value >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    """argparse type: a number > 0 (a learning rate, a temperature, a timeout)."""
    return _number(text, float, lambda value: value > 0, "a positive number")


def port_number(text: str) -> int:
    """argparse type: a TCP port, 1-65535."""
    return _number(text, int, lambda value: 1 <= value <= 65535, "a port number (1-65535)")
