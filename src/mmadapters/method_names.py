"""What each method is called, for people: its short name, a title (the demo) and one line saying what it is
(model cards).

A bottom-layer table that imports nothing: the Hub code, which must not import the models, reads it, and so does
the method registry (`mmadapters.methods`), so the names live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MethodNames:
    """The names of one method (keyed by its `model_type` in `METHOD_NAMES`)."""

    name: str
    title: str
    description: str


METHOD_NAMES = {
    "lavin": MethodNames(
        "LaVIN",
        "LaVIN (Mixture-of-Modality Adaptation)",
        "MM-Adapters (Mixture-of-Modality Adaptation, Luo et al., NeurIPS 2023)",
    ),
    "crome": MethodNames(
        "CROME",
        "CROME (cross-modal adapter + instruction-aware Q-Former)",
        "a gated cross-modal adapter behind an instruction-aware Q-Former (CROME, 2024)",
    ),
}
