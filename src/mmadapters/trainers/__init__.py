"""Training: Trainer subclasses and collators."""

from .collator import VisionLanguageCollator
from .trainer import AdapterTrainer, CromeTrainer, LavinTrainer, trainable_report

__all__ = ["AdapterTrainer", "CromeTrainer", "LavinTrainer", "VisionLanguageCollator", "trainable_report"]
