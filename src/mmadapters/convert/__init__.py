"""Conversions from other checkpoints: InstructBLIP -> CROME initialisation."""

from .instructblip import from_instructblip

__all__ = ["from_instructblip"]
