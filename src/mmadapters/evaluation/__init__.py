"""Evaluation: generation-based accuracy with answer extraction, easy-vqa and ScienceQA scorers."""

from .easy_vqa import evaluate_easy_vqa
from .generate import generate_answers, progress_bar
from .scoring import (
    SCIENCEQA_COLUMNS,
    accuracy_by_group,
    extract_described_answer,
    extract_letter,
    extract_word,
    scienceqa_categories,
    scienceqa_table,
)

__all__ = [
    "SCIENCEQA_COLUMNS",
    "accuracy_by_group",
    "evaluate_easy_vqa",
    "extract_described_answer",
    "extract_letter",
    "extract_word",
    "generate_answers",
    "progress_bar",
    "scienceqa_categories",
    "scienceqa_table",
]
